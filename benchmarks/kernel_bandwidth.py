"""Bandwidth of accumopt's Triton micro-step on GPT-2-124M's parameter list, against a
device-to-device copy of the same bytes timed in the same run and torch.optim.AdamW(fused=True).

    python -m benchmarks.kernel_bandwidth [--out FILE.json]

On CUDA it times with triton.testing.do_bench (median). Without a GPU it runs a smoke test of
the same code at 1/16 of GPT-2's width under Triton's interpreter; those numbers mean nothing.

Bytes counted per element (4 per fp32 value): copy reads θ and writes it (2); AdamW's step reads
g, θ, m, v and writes θ, m, v (7); accumopt's fold reads g, m, v and writes m, v (5); its update
micro-step folds and moves in the same pass: reads g, θ, m, v, writes θ, m, v (7). SGDM's fold
reads g, buf and writes buf (3); its update reads g, θ, buf and writes θ, buf (5).
"""
import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from accumopt import AccumAdamW, AccumSGDM  # noqa: E402
from benchmarks.shapes import gpt2_shapes  # noqa: E402

FOLD_FOREVER = 2 ** 30  # accum_steps that never ends the window: every step is a fold


def timer(device):
    if device == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    import time

    def cpu_time(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cpu_time


def measure(device, shapes):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    time_ms = timer(device)

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    flat = torch.empty(numel, device=device)
    flat_copy = torch.empty_like(flat)
    rows = [("copy (device to device)", 2, time_ms(lambda: flat_copy.copy_(flat)))]

    fused = device == "cuda"
    torch_opt = torch.optim.AdamW(params, fused=fused)
    set_grads()
    rows.append((f"torch AdamW({'fused' if fused else 'single-tensor'}) step", 7,
                 time_ms(torch_opt.step)))

    for name, cls, fold_bytes, update_bytes in (("AccumAdamW", AccumAdamW, 5, 7),
                                                ("AccumSGDM", AccumSGDM, 3, 5)):
        for label, accum_steps, nbytes in (("fold", FOLD_FOREVER, fold_bytes),
                                           ("update micro-step", 1, update_bytes)):
            opt = cls(params, accum_steps=accum_steps, backend="triton")
            set_grads()
            opt.step()  # builds the tables and compiles
            rows.append((f"accumopt {name} {label}", nbytes, time_ms(opt.step)))

    copy_gbps = 2 * 4 * numel / rows[0][2] / 1e6
    return [dict(impl=impl, ms=ms, GBps=nbytes * 4 * numel / ms / 1e6,
                 fraction_of_copy=nbytes * 4 * numel / ms / 1e6 / copy_gbps)
            for impl, nbytes, ms in rows], numel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = gpt2_shapes() if device == "cuda" else gpt2_shapes(n_layer=2, d_model=48, vocab=512,
                                                                n_ctx=64)
    rows, numel = measure(device, shapes)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter smoke)"
    print(f"{name}: {len(shapes)} tensors, {numel / 1e6:.1f}M fp32 elements")
    print("| impl | ms | GB/s | of copy |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['impl']} | {row['ms']:.3f} | {row['GBps']:.0f} | "
              f"{row['fraction_of_copy']:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "tensors": len(shapes),
                       "elements": numel, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
