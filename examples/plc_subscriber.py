"""Minimal line-controller side of inspectd: subscribe to one line's verdicts, act, and notice gaps.

python examples/plc_subscriber.py [tcp://127.0.0.1:5556] [line-1]
"""

import json
import sys

import zmq

endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5556"
line = sys.argv[2] if len(sys.argv) > 2 else "line-1"
sub = zmq.Context().socket(zmq.SUB)
sub.connect(endpoint)
sub.setsockopt_string(zmq.SUBSCRIBE, line)  # topic = line id (prefix match: use distinct line ids)
sub.setsockopt(zmq.RCVTIMEO, 3000)  # no heartbeat for 3 s: treat the daemon as down
boot, last = None, None
while True:
    try:
        _topic, payload = sub.recv_multipart()
    except zmq.Again:
        print("NO HEARTBEAT - daemon down? fail safe: divert every part", flush=True)
        continue
    msg = json.loads(payload)
    if msg["boot_id"] != boot:  # daemon (re)started: seq restarts at 1
        boot, last = msg["boot_id"], (0 if boot else None)
    seq = msg["seq"] if msg["type"] == "verdict" else msg["seq_last"] + 1
    if last is not None and seq > last + 1:
        print(f"GAP: verdicts {last + 1}..{seq - 1} lost - divert those parts", flush=True)
    last = seq if msg["type"] == "verdict" else seq - 1
    if msg["type"] == "verdict":
        gate = "divert" if msg["verdict"] == "REJECT" else "pass"
        print(f"{msg['seq']} {msg['frame_id']} {msg['verdict']} {msg['reason']} -> {gate}", flush=True)
