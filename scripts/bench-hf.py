#!/usr/bin/env python3
"""The peer measurement: HF transformers' DeepseekV4ForCausalLM on the same config, fp32, CPU (or a GPU
with --device cuda, for scripts/device-check.sh).

Run side by side with `v4 bench` / `v4 bench-infer` on a quiet machine (never in CI):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers==5.24.0
    /tmp/hf/bin/python scripts/bench-hf.py --config tests/fixtures/bench/v4-small.hf-config.json --threads 2
Modes: forward (full-sequence prefill of --seq tokens), decode (greedy tokens/s after the prefill, timed
warm as generate(N) - generate(1) over N - 1 tokens), train (one AdamW step on batch --train-batch x
--train-seq). `--ids FILE` (JSONL `{"ids": [..]}`, as `scripts/bench-peers.sh` writes for both sides) gives
the token ids; the threads default to the core count, as v4's do.
"""
import argparse, json, os, statistics, time

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ids", help="JSONL of {\"ids\": [..]} records: the token ids (default: seeded random)")
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
    def token_ids(n):
        """The first n ids of --ids (records concatenated in order), else n seeded random ones."""
        if not args.ids:
            return torch.randint(0, cfg.vocab_size, (n,))
        out = []
        for line in open(args.ids):
            if line.strip():
                out.extend(json.loads(line)["ids"])
            if len(out) >= n:
                return torch.tensor(out[:n])
        raise SystemExit(f"{args.ids}: holds {len(out)} token ids, the benchmark needs {n}")

    ids = token_ids(args.seq).reshape(1, args.seq).to(dev)
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
        def greedy(n):
            t = now()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert out.shape[1] - ids.shape[1] == n
            return now() - t

        with torch.no_grad():
            # generate() prefills with logits_to_keep=1 (the last position's logits only), as v4 does.
            prefills = []
            for _ in range(args.iters):
                t = now()
                model(ids, use_cache=True, logits_to_keep=1)
                prefills.append(now() - t)
            prefill = statistics.median(prefills)
            greedy(2)  # warm-up of generate's own setup
            # Warm decode: generate(N) - generate(1) is N - 1 decode steps, without the prefill and setup.
            full, one = greedy(args.generate), greedy(1)
        n = args.generate - 1
        print(f"hf prefill (logits_to_keep=1): median {prefill:.3f}s over {len(prefills)} runs (min {min(prefills):.3f}s) -> {args.seq / prefill:.1f} tokens/s")
        print(f"hf decode: {n} tokens in {full - one:.2f}s (generate({args.generate}) {full:.2f}s - generate(1) {one:.2f}s) -> {n / (full - one):.1f} tokens/s")
    if "train" in modes:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # Consecutive windows of train_seq + 1 ids, as v4 train cuts its data (inputs and shifted targets).
        w = args.train_seq + 1
        stream = token_ids((args.iters + 1) * args.train_batch * w).reshape(args.iters + 1, args.train_batch, w)
        times = []
        for i in range(args.iters + 1):
            x = stream[i].to(dev)
            t = now()
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i > 0:
                times.append(now() - t)
        m = statistics.median(times)
        print(f"hf train step: median {m:.3f}s -> {args.train_batch * args.train_seq / m:.1f} tokens/s")


if __name__ == "__main__":
    main()
