"""A FAKE peer side for tests/test_peers.py: speaks `benchmarks/peers/peer_side.py`'s protocol
(ready line, then one JSON answer a request) without learned_optimization, answering with
figures that only say the harness carried them: they measure nothing."""

import argparse
import json
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--particles", type=int, default=8)
args = parser.parse_args()
print(json.dumps({"ready": True, "jax": "fake", "fake": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "pes_seconds" in request:
        time.sleep(0.01)
        print(json.dumps({"inner_steps_per_s": 1000.0}), flush=True)
    else:
        print(json.dumps({"ms": {"adafac_mlp": 5.0, "mlp": 4.0, "adam": 0.5}}), flush=True)
