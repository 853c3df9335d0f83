"""step: on GPT-2-124M's 148 parameters, the wall time of a fold micro-step and an update
micro-step including host overhead, and the kernels each launches (torch.profiler, CUDA only),
per micro-step and per window of 8, for each AdamW implementation of the kernels suite."""
import time

import torch

from benchmarks import peers
from benchmarks.shapes import gpt2_shapes
from benchmarks.suite_kernels import impls as kernel_impls
from benchmarks.timing import synchronize

SUITE = "step"
K = 8


def _shapes(device, quick):
    if device == "cuda" and not quick:
        return "gpt2-124M", gpt2_shapes()
    return "gpt2-tiny", gpt2_shapes(n_layer=2, d_model=64, vocab=1024, n_ctx=64)


def impls(device):
    return [(name, make) for name, variant, _, make in kernel_impls(device) if variant == "adamw"]


def wall_ms(fn, device, reps):
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / reps


def cuda_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def run(device, quick, results, progress):
    if peers.optimi() is None:
        results.note(SUITE, peers.MISSING)
    if device != "cuda":
        results.note(SUITE, "no GPU: kernel launches are not counted")
    case, shapes = _shapes(device, quick)
    for name, make in impls(device):
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        made = peers.guarded(name == "torch-optimi", results, SUITE, progress, name,
                             lambda: make(params))
        if made is None:
            continue
        fold, update = made
        walls = {}
        for what, fn in (("fold", fold), ("update", update)):
            walls[what] = wall_ms(fn, device, reps=20 if device == "cuda" else 3)
            results.add(SUITE, case, name, f"{what}_wall_ms", walls[what], "ms")
            if device == "cuda":
                results.add(SUITE, case, name, f"{what}_launches", cuda_launches(fn), "kernels")
        results.add(SUITE, case, name, "window_wall_ms",
                    (K - 1) * walls["fold"] + walls["update"], "ms")
        if device == "cuda":
            launches = {r["metric"]: r["value"] for r in results.select(SUITE)
                        if r["impl"] == name and r["metric"].endswith("_launches")}
            results.add(SUITE, case, name, "window_launches",
                        (K - 1) * launches["fold_launches"] + launches["update_launches"],
                        "kernels")
        del params, fold, update
        progress.advance(f"{SUITE}: {name}")


def work(device, quick):
    return len(impls(device))
