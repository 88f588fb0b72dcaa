#!/usr/bin/env python3
"""The peer measurement: HF transformers' DeepseekV4ForCausalLM on the same config, fp32, CPU (or a GPU
with --device cuda, for scripts/device-check.sh).

Run side by side with `v4 bench` / `v4 bench-infer` on a quiet machine (never in CI):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers==5.24.0
    /tmp/hf/bin/python scripts/bench-hf.py --config tests/fixtures/bench/v4-small.hf-config.json --threads 2
Modes: forward (full-sequence prefill of --seq tokens), decode (greedy tokens/s after the prefill),
train (one AdamW step on batch --train-batch x --train-seq).
"""
import argparse, json, statistics, time

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--modes", default="forward")
    p.add_argument("--generate", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    dev = torch.device(args.device)

    def now():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = DeepseekV4Config(**json.load(open(args.config)))
    model = DeepseekV4ForCausalLM(cfg).float().eval().to(dev)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq)).to(dev)
    modes = args.modes.split(",")
    if "forward" in modes:
        with torch.no_grad():
            model(ids)
            times = []
            for _ in range(args.iters):
                t = now()
                model(ids)
                times.append(now() - t)
        m = statistics.median(times)
        print(f"hf forward: median {m:.3f}s over {len(times)} runs (min {min(times):.3f}s) -> {args.seq / m:.1f} tokens/s")
    if "decode" in modes:
        with torch.no_grad():
            t = now()
            out = model.generate(ids, max_new_tokens=args.generate, do_sample=False, min_new_tokens=args.generate)
            total = now() - t
            # generate() prefills with logits_to_keep=1 (the last position's logits only), as v4 does.
            prefills = []
            for _ in range(args.iters):
                t = now()
                model(ids, use_cache=True, logits_to_keep=1)
                prefills.append(now() - t)
            prefill = statistics.median(prefills)
        n = out.shape[1] - ids.shape[1]
        print(f"hf prefill (logits_to_keep=1): median {prefill:.3f}s over {len(prefills)} runs (min {min(prefills):.3f}s) -> {args.seq / prefill:.1f} tokens/s")
        print(f"hf decode: {n} tokens in {total - prefill:.2f}s after a {prefill:.2f}s prefill -> {n / (total - prefill):.1f} tokens/s")
    if "train" in modes:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (args.train_batch, args.train_seq)).to(dev)
        times = []
        for i in range(args.iters + 1):
            t = now()
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i > 0:
                times.append(now() - t)
        m = statistics.median(times)
        print(f"hf train step: median {m:.3f}s -> {args.train_batch * args.train_seq / m:.1f} tokens/s")


if __name__ == "__main__":
    main()
