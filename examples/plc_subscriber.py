"""Minimal line-controller side of inspectd: subscribe to one line's verdicts, act, and notice gaps.

python examples/plc_subscriber.py [tcp://127.0.0.1:5556] [line-1]
"""

import json
import sys

import zmq

from daemon.sequence import SequenceTracker  # stdlib only: seq per boot_id, gaps, restarts

endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5556"
line = sys.argv[2] if len(sys.argv) > 2 else "line-1"
sub = zmq.Context().socket(zmq.SUB)
sub.connect(endpoint)
sub.setsockopt_string(zmq.SUBSCRIBE, line)  # topic = line id (prefix match: use distinct line ids)
sub.setsockopt(zmq.RCVTIMEO, 3000)  # no heartbeat for 3 s: treat the daemon as down
sequence = SequenceTracker()
while True:
    try:
        _topic, payload = sub.recv_multipart()
    except zmq.Again:
        print("NO HEARTBEAT - daemon down? fail safe: divert every part", flush=True)
        continue
    msg = json.loads(payload)
    for note in sequence.feed(msg):  # "GAP: missed seq a..b": those parts have no verdict - divert them
        print(note, flush=True)
    if msg["type"] == "verdict":
        gate = "divert" if msg["verdict"] == "REJECT" else "pass"
        print(f"{msg['seq']} {msg['frame_id']} {msg['verdict']} {msg['reason']} -> {gate}", flush=True)
