"""Issue 12's rule for an int8 retrieval key, end to end: the default fitted and scored with the `minilm-3` key and
with `minilm-3-int8` (the same graph with int8 MatMuls, export-onnx --embedder minilm-3-int8) on split halves of
every preset's quality-bench reference tables, as bench/key_policy.py scores keys (reference rows only). The issue
adopts an int8 key only if the default's macro metric stays within 0.5 point of its fp32 key's, on every preset,
and its top-10 neighbours overlap fp32's ≥ 0.9 (bench/keys.py).
"""

from __future__ import annotations

import sys

from key_policy import run

KEYS = ("minilm-3", "minilm-3-int8")

if __name__ == "__main__":
    sys.exit(run("key-int8", KEYS, ()))
