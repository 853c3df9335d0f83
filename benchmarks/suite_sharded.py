"""sharded: gradient memory and communication per rank for a window of k micro-batches on R
CPU gloo ranks, for DDP, DDP + no_sync, AccumAdamW with process_group, FSDP2 with a
reduce-scatter every micro-step, FSDP2 with no sync until the last micro-step, and AccumAdamW on
the same FSDP2 model in step mode and fold_in_backward (fp32, mean_of_squares unless named).
Measured on the CPU whatever the device, each method on freshly spawned ranks, rank 0's
numbers, in the second window (the first builds the state and warms gloo's buffers).

Memory is glibc's count of its mmapped blocks (mallinfo2's hblkhd) with the mmap threshold
fixed at 64 KiB, so every tensor of at least 64 KiB, in any thread, is counted from its
allocation to its free; it is read after every aten op (a dispatch mode) for the peak. Smaller
tensors (biases) are left out; gloo's own buffers of that size are in.

- `carried_MiB`: the bytes held after each micro-step's step() and zero_grad() beyond the
  window's start (the least over the window's micro-steps but the last): the gradient memory the
  accumulation carries from one micro-batch to the next.
- `peak_over_start_MiB`: the window's peak beyond its start (gradients as backward makes them,
  FSDP2's unsharded parameters and gradients, collective buffers, the optimizer's temporaries).
- `params_state_MiB`: the rank's parameters and optimizer state (its shards under FSDP2).
- `boundary_extra_MiB`: what lives at the window's start beyond them (DDP's buckets, gloo's
  cached buffers).
- `comm_MiB`: bytes through collectives per window (torch.profiler's gloo events), each counted
  as its full unsharded buffer (gloo runs a reduce-scatter as an all-reduce of the full buffer;
  NCCL's ring sends (R-1)/R of it for all-gather and reduce-scatter, 2(R-1)/R for all-reduce)."""
import datetime
import gc
import os
import socket
import tempfile

import torch
from torch import nn

SUITE = "sharded"
K = 4
WORLD_SIZE = 2
ROWS = 4                      # rows per micro-batch per rank: activations stay negligible
METHODS = ["DDP", "DDP + no_sync", "AccumAdamW process_group step",
           "AccumAdamW process_group fold_in_backward", "FSDP2 sync every micro-step",
           "FSDP2 no sync until last", "AccumAdamW on FSDP2 step",
           "AccumAdamW on FSDP2 fold_in_backward",
           "AccumAdamW on FSDP2 fold_in_backward square_of_mean"]


def _sizes(quick):
    # The same in quick runs: smaller layers drown in gloo's own buffers of similar size.
    return 4, 512


def _model(layers, width):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _batch(rank, i, width):
    gen = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(ROWS, width, generator=gen), torch.randn(ROWS, width, generator=gen)


def _local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _build(method, layers, width):
    """(model, optimizer, per-micro-step hook, loss divisor): the method's standard loop."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from accumopt import AccumAdamW
    model = _model(layers, width)
    fold = "fold_in_backward" in method
    second_moment = "square_of_mean" if "square_of_mean" in method else "mean_of_squares"
    if method.startswith("DDP"):
        ddp = DDP(model)
        return ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3), K
    if "process_group" in method:
        opt = AccumAdamW(model.parameters(), lr=1e-3, accum_steps=K, fold_in_backward=fold,
                         second_moment=second_moment,
                         process_group=torch.distributed.group.WORLD, backend="torch")
        return model, opt, 1
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    if method.startswith("FSDP2"):
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), K
    opt = AccumAdamW(model.parameters(), lr=1e-3, accum_steps=K, fold_in_backward=fold,
                     second_moment=second_moment, backend="torch")
    return model, opt, 1


class _MappedBytes:
    """glibc's count of the bytes it holds in mmapped blocks (mallinfo2's hblkhd), for the whole
    process and all of its threads. With the mmap threshold fixed at MMAP_THRESHOLD (so glibc
    never raises it), every tensor of at least that size is one such block, allocated and freed
    with it; smaller ones (biases) are left out."""
    MMAP_THRESHOLD = 1 << 16
    M_MMAP_THRESHOLD = -3

    def __init__(self):
        import ctypes

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = Mallinfo2
        if self.libc.mallopt(self.M_MMAP_THRESHOLD, self.MMAP_THRESHOLD) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")

    def __call__(self):
        return self.libc.mallinfo2().hblkhd


def _peak_tracker(mapped):
    """A dispatch mode that reads the mapped bytes after every aten op (forward, backward,
    FSDP2's copies, the optimizer): their peak at op granularity since the last reset."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakTracker(TorchDispatchMode):
        peak = 0

        def reset(self):
            peak, self.peak = self.peak, mapped()
            return peak

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, mapped())
            return out
    return PeakTracker()


def _window(method, model, opt, divisor, rank, window, width, tracker=None, mapped=None):
    """One window of the method's loop. With a tracker: the peak of the backwards and of the
    steps, and the bytes held between micro-steps (after one micro-step's step() and
    zero_grad(), before the next forward: what the window carries along)."""
    import contextlib
    peaks = {"backward": 0, "step": 0, "start": mapped() if mapped else 0}
    held = []
    for t in range(K):
        last = t == K - 1
        sync = contextlib.nullcontext()
        if method == "DDP + no_sync" and not last:
            sync = model.no_sync()
        if method == "FSDP2 no sync until last":
            model.set_requires_gradient_sync(last)
        x, y = _batch(rank, window * K + t, width)
        if tracker is not None:
            tracker.reset()
        with sync:
            (nn.functional.mse_loss(model(x), y) / divisor).backward()
        if tracker is not None:
            peaks["backward"] = max(peaks["backward"], tracker.reset())
        if divisor == 1 or last:
            opt.step()
            opt.zero_grad()
        if tracker is not None:
            peaks["step"] = max(peaks["step"], tracker.reset())
            if not last:
                held.append(mapped())
    peaks["held"] = min(held) if held else 0
    if mapped:
        # The window's boundary: the lesser of the readings before it and after it (a buffer
        # gloo's thread frees a moment late shows up in one of them only).
        peaks["start"] = min(peaks["start"], mapped())
    return peaks


def _measure(method, rank, quick):
    from torch.profiler import ProfilerActivity, profile, record_function
    layers, width = _sizes(quick)
    mapped = _MappedBytes()
    gc.collect()
    base = mapped()            # before the model: what earlier methods and libraries left
    model, opt, divisor = _build(method, layers, width)
    _window(method, model, opt, divisor, rank, 0, width)
    with _peak_tracker(mapped) as tracker:
        peaks = _window(method, model, opt, divisor, rank, 1, width, tracker, mapped)
    # The profiler's own buffers would count as memory: the collectives are read in a third
    # window.
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("accumopt-bench-window"):
            _window(method, model, opt, divisor, rank, 2, width)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    params_state = _local_bytes(model.parameters()) + _local_bytes(state)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    events = list(prof.profiler.kineto_results.events())
    [marker] = [e for e in events if e.name() == "accumopt-bench-window"]
    start, end = marker.start_ns(), marker.start_ns() + marker.duration_ns()
    comm = 0
    for e in events:
        if e.name().startswith("gloo:") and start <= e.start_ns() <= end and e.shapes():
            numel = 1
            for d in e.shapes()[0]:
                numel *= d
            scale = WORLD_SIZE if e.name() == "gloo:all_gather" else 1
            comm += numel * scale * _element_size(e.dtypes()[0])
    return {"start": peaks["start"] - base, "held": peaks["held"] - base,
            "peak": max(peaks["backward"], peaks["step"]) - base,
            "params_state": params_state, "comm": comm}


def _element_size(dtype_name):
    return {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
            "int": 4}.get(dtype_name, 4)


def _worker(rank, method, port, quick, out_dir):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        try:
            row = _measure(method, rank, quick)
        except Exception as err:          # a failing method must not hide the others
            row = f"{type(err).__name__}: {err}"
        torch.save(row, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(method, quick):
    """One method on WORLD_SIZE freshly spawned gloo ranks (nothing of another method's run is
    left in the process to be freed during this one); rank 0's numbers."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(method, _free_port(), quick, out_dir), nprocs=WORLD_SIZE)
        return torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)


def run(device, quick, results, progress):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        results.note(SUITE, "torch.distributed with gloo is not available: not measured")
        for method in METHODS:
            progress.advance(f"{SUITE}: {method}")
        return
    layers, width = _sizes(quick)
    params = sum(p.numel() for p in _model(layers, width).parameters())
    case = f"{layers}x Linear({width}) P={params:,} R={WORLD_SIZE} k={K} fp32"
    results.note(SUITE, f"P = {params:,} parameters = {params * 4 / 2 ** 20:.2f} MiB in fp32; "
                        f"CPU gloo ranks on this machine, whatever the device")
    mib = 2 ** 20
    for method in METHODS:
        row = measure(method, quick)
        if isinstance(row, str):
            results.note(SUITE, f"{method} failed: {row}")
        else:
            for metric, value in (("carried_MiB", row["held"] - row["start"]),
                                  ("peak_over_start_MiB", row["peak"] - row["start"]),
                                  ("params_state_MiB", row["params_state"]),
                                  ("boundary_extra_MiB", row["start"] - row["params_state"]),
                                  ("comm_MiB", row["comm"])):
                results.add(SUITE, case, method, metric, value / mib, "MiB")
        progress.advance(f"{SUITE}: {method}")


def work(device, quick):
    return len(METHODS)
