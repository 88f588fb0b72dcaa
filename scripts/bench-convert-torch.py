#!/usr/bin/env python3
"""The PyTorch peer of `v4 convert --to fp4-mx` for the FP8 -> MXFP4 (RCEIL) benchmark of issue 3.

Reads a DeepSeek release-layout FP8 checkpoint (F8_E4M3 weights + F8_E8M0 128x128 scales, sharded with
model.safetensors.index.json), dequantizes every FP8 weight to f32, re-quantizes it to MXFP4 exactly as
DeepSeek-V4 ships experts (E2M1 codes packed two per byte, low nibble first; one E8M0 scale per 32 along
a row, RCEIL: 2^ceil(log2(amax / 6)) computed on the exact float bits), and writes the shards back with
safetensors. Reports GB/s of FP8 input. `--check DIR` compares the output with v4's bit for bit.

Usage (on the checkpoint `cargo run --release -p v4-convert --example bench_fp8_to_fp4 -- --generate DIR`
writes):
    /work/hfvenv/bin/python scripts/bench-convert-torch.py --input DIR --output OUT --threads 2
"""

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

# E2M1 magnitudes by code: 0, 0.5, 1, 1.5, 2, 3, 4, 6. Round to nearest, ties to the even code:
# a tie at a midpoint goes down where the lower code is even (0.25, 1.25, 2.5, 5) and up otherwise.
MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
TIES_UP = torch.tensor([0.75, 1.75, 3.5])


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    s = scale.to(torch.float32)
    s = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return codes.to(torch.float32) * s


def rceil_exponent(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(amax / 6)) on the exact bits of amax / 6 (no log2 rounding), clamped to E8M0."""
    x = (amax / 6.0).clamp_min(torch.finfo(torch.float32).tiny)
    bits = x.view(torch.int32)
    exponent = (bits >> 23) - 127
    mantissa = bits & 0x7FFFFF
    return (exponent + (mantissa != 0).to(torch.int32)).clamp(-127, 127)


def quantize_mxfp4(w: torch.Tensor):
    rows, cols = w.shape
    blocks = w.view(rows, cols // 32, 32)
    e = rceil_exponent(blocks.abs().amax(-1))
    q = blocks / torch.pow(2.0, e.to(torch.float32)).unsqueeze(-1)
    a = q.abs().clamp_max(6.0)
    code = torch.bucketize(a, MIDPOINTS, right=False)
    code += torch.isin(a, TIES_UP).to(code.dtype)
    code |= torch.signbit(q).to(code.dtype) << 3  # -0 keeps its sign, as in v4
    code = code.to(torch.uint8).view(rows, cols // 2, 2)
    packed = (code[..., 0] | (code[..., 1] << 4)).view(torch.int8)
    scale = (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed, scale


def convert(inp: str, out: str) -> int:
    with open(os.path.join(inp, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    total = 0
    for shard in shards:
        tensors = load_file(os.path.join(inp, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        result = {}
        for name, t in tensors.items():
            if t.dtype != torch.float8_e4m3fn:
                continue
            w = dequantize(t, tensors[name.replace(".weight", ".scale")])
            packed, scale = quantize_mxfp4(w)
            result[name] = packed
            result[name.replace(".weight", ".scale")] = scale
        save_file(result, os.path.join(tmp, shard))
        with open(os.path.join(tmp, shard), "rb+") as f:
            os.fsync(f.fileno())
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return total


def check(ours: str, theirs: str) -> None:
    """Every tensor of our output equals v4's byte for byte."""
    with open(os.path.join(theirs, "model.safetensors.index.json")) as f:
        theirs_map = json.load(f)["weight_map"]
    cache = {}
    compared = 0
    for shard in sorted(os.listdir(ours)):
        if not shard.endswith(".safetensors"):
            continue
        for name, t in load_file(os.path.join(ours, shard)).items():
            other_shard = theirs_map[name]
            if other_shard not in cache:
                cache.clear()
                cache[other_shard] = load_file(os.path.join(theirs, other_shard))
            other = cache[other_shard][name]
            a = t.view(torch.uint8) if t.element_size() == 1 else t
            b = other.view(torch.uint8) if other.element_size() == 1 else other
            assert a.shape == b.shape and torch.equal(a, b), f"{name} differs from v4's"
            compared += 1
    print(f"check: {compared} tensors equal to v4's output byte for byte")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check", help="v4's fp4-mx output of the same input, to compare bit for bit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    total = convert(args.input, args.output)
    seconds = time.perf_counter() - start
    print(
        f"torch {torch.__version__}, {args.threads} threads: FP8 -> MXFP4 RCEIL of {total / 1e9:.3f} GB "
        f"in {seconds:.2f} s = {total / 1e9 / seconds:.3f} GB/s"
    )
    if args.check:
        check(args.output, args.check)


if __name__ == "__main__":
    main()
