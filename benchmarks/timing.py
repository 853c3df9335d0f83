"""Timing: triton.testing.do_bench's median on CUDA, a median of repeated runs on the CPU."""
import statistics
import time

import torch


def median_ms(fn, device, reps=None):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps or 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbps(device, numel):
    """Device-to-device copy bandwidth (read + write) over ``numel`` fp32 elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * 4 * numel / ms / 1e6


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()
