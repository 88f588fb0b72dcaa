#!/usr/bin/env python3
"""Pins Ascend's weight formats with PyTorch, independently of v4's Rust codecs.

Writes tests/fixtures/formats/ascend_vectors.json:
- int8_per_channel: symmetric INT8, one scale per row (msModelSlim W8A8_DYNAMIC weights, and the
  per-token activation quantization of npu_dynamic_quant): scale = amax / 127, q = torch.round(x / scale)
  (half to even), clamped to [-127, 127].
- mxfp8_ocp: OCP MX v1.0 MXFP8 (E4M3 elements, E8M0 scale per 32 along the row): X = floor(log2 amax) - 8
  clamped to [-127, 127], elements = float8_e4m3fn(clamp(x / 2^X, -448, 448)).

Run with the HF venv's python (torch 2.15): python scripts/gen-ascend-vectors.py
"""
import json
import pathlib

import torch

g = torch.Generator().manual_seed(20261207)


def bits(t):
    return [f"0x{b & 0xFFFFFFFF:08x}" for b in t.contiguous().view(torch.int32).flatten().tolist()]


def int8_per_channel():
    rows = [torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -127.0] + [0.0] * 42)]
    rows += [torch.randn(48, generator=g) * s for s in (1e-3, 0.02, 1.0, 300.0)]
    rows.append(torch.zeros(48))
    out = []
    for x in rows:
        x = x.float()
        amax = x.abs().max()
        scale = amax / 127.0
        q = torch.zeros(48, dtype=torch.int8) if amax == 0 else torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        out.append({"x_f32_bits": bits(x), "scale_f32_bits": bits(scale.reshape(1))[0], "codes": q.tolist()})
    return out


def mxfp8_ocp():
    cols = 80  # two whole blocks and a short one
    x = torch.randn(3, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (3, cols), generator=g).float())
    x[0, :32] = torch.linspace(-1.99, 1.99, 32) * 256.0  # rounds past 448: saturates
    x[1, 32:64] = 0.0  # an all-zero block
    rows = []
    for r in range(3):
        codes, scales = [], []
        for b in range(0, cols, 32):
            blk = x[r, b:b + 32]
            amax = blk.abs().max()
            e = (torch.frexp(amax).exponent - 1 - 8).item() if amax > 0 else -127
            e = max(-127, min(127, e))
            q = torch.clamp(torch.ldexp(blk, torch.tensor(-e)), -448.0, 448.0).to(torch.float8_e4m3fn)
            codes += q.view(torch.uint8).tolist()
            scales.append(e + 127)
        rows.append({"x_f32_bits": bits(x[r]), "codes": codes, "scales_e8m0": scales})
    return {"cols": cols, "rows": rows}


doc = {
    "generator": f"scripts/gen-ascend-vectors.py, torch {torch.__version__}",
    "int8_per_channel": int8_per_channel(),
    "mxfp8_ocp": mxfp8_ocp(),
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/formats/ascend_vectors.json"
path.write_text(json.dumps(doc, indent=1) + "\n")
print(f"wrote {path}")
