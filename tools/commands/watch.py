"""Print verdicts live from the daemon's PUB socket and report sequence gaps and restarts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from daemon.sequence import SequenceTracker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", default="tcp://127.0.0.1:5556", help="the daemon's verdict endpoint")
    parser.add_argument("--line", default="", help="line id to subscribe to (default: all)")
    parser.add_argument("--count", type=int, default=None, help="exit after this many verdicts")
    parser.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    parser.add_argument("--json", action="store_true", help="print the raw JSON messages")
    parser.add_argument("--heartbeats", action="store_true", help="print heartbeats too")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    import zmq

    from daemon.subscriber import receive, subscribe

    out = out or sys.stdout
    # A foreground loop (it stops on --count, --timeout or Ctrl-C, and warns on silence) on the receive step
    # every subscriber uses (daemon.subscriber).
    sock = subscribe(zmq.Context.instance(), args.connect, args.line)
    sequence = SequenceTracker()  # gaps and restarts: the rule every subscriber uses
    n = 0
    silence_warned = False
    t_end = time.monotonic() + args.timeout if args.timeout else None
    t_last = time.monotonic()
    try:
        while (args.count is None or n < args.count) and (t_end is None or time.monotonic() < t_end):
            got = receive(sock, 200)
            if got is None:
                if time.monotonic() - t_last > 5.0 and not silence_warned:
                    print("no message for 5 s: daemon down or wrong endpoint/line?", file=out, flush=True)
                    silence_warned = True
                continue
            msg, t_last, silence_warned = got.msg, got.t_arrival, False
            for note in sequence.feed(msg):
                print(note, file=out, flush=True)
            if msg["type"] == "verdict":
                n += 1
            if args.json and (msg["type"] == "verdict" or args.heartbeats):
                print(json.dumps(msg), file=out, flush=True)
            elif msg["type"] == "verdict":
                score = "   -  " if msg["score"] is None else f"{msg['score']:.4f}"
                print(
                    f"{msg['seq']:>8} {msg['verdict']:<6} {msg['reason']:<13} {score} "
                    f"{msg['latency_ms']:>8.1f} ms  {msg['frame_id']}",
                    file=out,
                    flush=True,
                )
            elif args.heartbeats:
                print(f"heartbeat seq_last={msg['seq_last']} ready={msg['ready']}", file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    print(f"{n} verdicts, {len(sequence.gaps)} gap(s), {sequence.restarts} restart(s)", file=out, flush=True)
    return 0
