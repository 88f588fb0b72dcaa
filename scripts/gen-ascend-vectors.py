#!/usr/bin/env python3
"""Pins Ascend's weight formats with PyTorch, independently of v4's Rust codecs.

Writes tests/fixtures/formats/ascend_vectors.json:
- int8_per_channel: symmetric INT8, one scale per row (msModelSlim W8A8_DYNAMIC weights, and the
  per-token activation quantization of npu_dynamic_quant): scale = amax / 127, q = torch.round(x / scale)
  (half to even), clamped to [-127, 127].
- mxfp8_ocp: OCP MX v1.0 MXFP8 (E4M3 elements, E8M0 scale per 32 along the row): X = floor(log2 amax) - 8
  clamped to [-127, 127], elements = float8_e4m3fn(clamp(x / 2^X, -448, 448)).
- int4_grouped: symmetric INT4 per group of a row (msModelSlim W4A8_DYNAMIC's experts; group = the row is
  per channel): scale = amax / 7, q = torch.round(x / scale) clamped to [-8, 7]; the codes packed two per
  byte along the output dimension (row 2j in the low nibble, 2j+1 in the high one, as vllm-ascend's
  `_pack_int4_to_int8` does after its transpose), and vllm-ascend's scale_bias, 8 * sum_k(q * scale), in
  float64, per chunk of K.

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


def int4_grouped():
    out = []
    for rows, cols, group, chunks in ((4, 64, 32, 1), (6, 48, 48, 1), (2, 64, 64, 16)):
        x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-6, 6, (rows, 1), generator=g).float())
        x[0, :6] = torch.tensor([7.0, 0.5, 1.5, 2.5, -2.5, -7.0])  # ties to even at scale 1
        xg = x.reshape(rows, cols // group, group)
        amax = xg.abs().amax(dim=2, keepdim=True)
        scale = amax / 7.0
        q = torch.where(amax > 0, torch.round(xg / torch.where(amax > 0, scale, 1.0)), 0.0).clamp(-8, 7)
        q = q.reshape(rows, cols).to(torch.int8)
        pairs = q.reshape(rows // 2, 2, cols)
        packed = (pairs[:, 0] & 0x0F) | (pairs[:, 1].to(torch.int16) << 4).to(torch.int8)
        bias = None
        if group == cols:
            qs = q.double() * scale.reshape(rows, 1).double()
            bias = (8 * qs.reshape(rows, chunks, cols // chunks).sum(dim=2)).flatten().tolist()
        out.append({
            "rows": rows, "cols": cols, "group": group, "chunks": chunks,
            "x_f32_bits": bits(x), "scale_f32_bits": bits(scale.flatten()),
            "codes": q.flatten().tolist(), "packed": packed.view(torch.uint8).flatten().tolist(),
            "scale_bias_f64": bias,
        })
    return out


doc = {
    "generator": f"scripts/gen-ascend-vectors.py, torch {torch.__version__}",
    "int8_per_channel": int8_per_channel(),
    "mxfp8_ocp": mxfp8_ocp(),
    "int4_grouped": int4_grouped(),
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/formats/ascend_vectors.json"
path.write_text(json.dumps(doc, indent=1) + "\n")
print(f"wrote {path}")
