"""Training memory and speed of gradient accumulation: a GPT-2-style model (benchmarks.gpt,
124M parameters on a GPU) trained with 8 micro-batches per window, bf16 autocast, fp32
parameters. Per implementation: peak torch.cuda.max_memory_allocated, tokens/s, and the loss
after the last window; plus the time backward takes with fold_in_backward's hooks against
without them (the cost of launching the folds inside backward).

    python -m benchmarks.train_memory [--out FILE.json]

Implementations: standard accumulation (loss / k, .grad sums, torch.optim.AdamW(fused=True) once
per window), AccumAdamW step mode, AccumAdamW fold_in_backward; the accumopt ones with both
second moments. Without a GPU it runs a tiny model on the CPU as a smoke test; those numbers
mean nothing.
"""
import argparse
import json
import time

import torch

from accumopt import AccumAdamW
from benchmarks.gpt import GPT

K = 8


def batches(vocab, batch, seq, device, count, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = torch.randint(0, vocab, (count, batch, seq + 1), generator=gen)
    return [(x[:, :-1].to(device), x[:, 1:].to(device)) for x in data]


def train(impl, config, data, windows, device):
    torch.manual_seed(0)
    model = GPT(**config).to(device)
    if impl == "standard":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    else:
        _, mode, second_moment = impl.split("/")
        opt = AccumAdamW(model.parameters(), lr=3e-4, accum_steps=K,
                         second_moment=second_moment, fold_in_backward=mode == "hook")
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    backward_s, start, loss = 0.0, None, None
    for i, (x, y) in enumerate(data[:windows * K]):
        if i == K:  # time from the second window on
            sync()
            start = time.perf_counter()
        with autocast:
            loss = model(x, y)
        sync()
        begin = time.perf_counter()
        (loss / K if impl == "standard" else loss).backward()
        sync()
        backward_s += (time.perf_counter() - begin) if i >= K else 0.0
        if impl == "standard":
            if (i + 1) % K == 0:
                opt.step()
                opt.zero_grad()
        else:
            opt.step()
            opt.zero_grad()
    sync()
    elapsed = time.perf_counter() - start
    tokens = (windows - 1) * K * x.numel()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    params = sum(p.numel() for p in model.parameters())
    if impl != "standard":
        opt.remove_hooks()
    return dict(impl=impl, peak_GiB=peak / 2 ** 30, tokens_per_s=tokens / elapsed,
                backward_ms=backward_s / ((windows - 1) * K) * 1e3, final_loss=loss.item(),
                params=params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        config, batch, seq = {}, 8, 1024
    else:
        config, batch, seq = dict(vocab=256, n_ctx=32, d_model=32, n_layer=2, n_head=2), 2, 32
    data = batches(config.get("vocab", 50257), batch, seq, device, args.windows * K)
    impls = ["standard", "accum/step/square_of_mean", "accum/hook/square_of_mean",
             "accum/step/mean_of_squares", "accum/hook/mean_of_squares"]
    rows = [train(impl, config, data, args.windows, device) for impl in impls]
    grad_bytes = 4 * rows[0]["params"]
    for row in rows:
        row["grad_bytes_saved"] = (rows[0]["peak_GiB"] - row["peak_GiB"]) * 2 ** 30 / grad_bytes
        row["throughput_vs_standard"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny smoke run)"
    print(f"{name}: {rows[0]['params'] / 1e6:.1f}M parameters, {K} micro-batches of "
          f"{batch}x{seq} tokens per window")
    print("| impl | peak GiB | fp32 grad bytes saved | tokens/s | vs standard | backward ms |"
          " final loss |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['peak_GiB']:.2f} | {r['grad_bytes_saved']:.0%} | "
              f"{r['tokens_per_s']:.0f} | {r['throughput_vs_standard']:.0%} | "
              f"{r['backward_ms']:.1f} | {r['final_loss']:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
