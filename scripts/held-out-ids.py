#!/usr/bin/env python3
"""Writes `input_ids` [rows, len] (i64, byte ids) from held-out Shakespeare text (Twelfth Night, Macbeth:
tests/fixtures/data/shakespeare/valid-full.jsonl, never trained on), for measuring the byte-level
v4-shakespeare-mtp model: python3 scripts/held-out-ids.py OUT.safetensors [rows] [len]. Needs numpy and
safetensors (the HF venv has both)."""
import json
import pathlib
import sys

import numpy as np
from safetensors.numpy import save_file

root = pathlib.Path(__file__).resolve().parent.parent
out, rows, length = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4, int(sys.argv[3]) if len(sys.argv) > 3 else 256
lines = (root / "tests/fixtures/data/shakespeare/valid-full.jsonl").read_text().splitlines()
text = "".join(json.loads(l)["text"] for l in lines).encode()
stride = len(text) // rows
ids = np.array([list(text[i * stride:i * stride + length]) for i in range(rows)], dtype=np.int64)
save_file({"input_ids": ids}, out)
print(f"wrote {out}: input_ids {list(ids.shape)}")
