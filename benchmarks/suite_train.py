"""train: a GPT-2-style model (benchmarks.gpt; 124M parameters on a GPU) trained with 8
micro-batches per window, fp32 parameters: peak torch.cuda.max_memory_allocated, tokens/s,
backward time and the loss after the last window, for standard accumulation (loss / k, .grad
sums, torch.optim.AdamW fused once per window), AccumAdamW step mode and fold_in_backward with
both second moments, and torch-optimi's gradient release with optimizer accumulation. The exact
variant (square_of_mean) must end on standard accumulation's loss. bf16 autocast on CUDA."""
import time

import torch

from accumopt import AccumAdamW
from benchmarks import peers
from benchmarks.gpt import GPT
from benchmarks.timing import synchronize

SUITE = "train"
K = 8
IMPLS = ["standard AdamW", "AccumAdamW step square_of_mean",
         "AccumAdamW hook square_of_mean", "AccumAdamW step mean_of_squares",
         "AccumAdamW hook mean_of_squares", "torch-optimi accumulation"]


def setup(device, quick):
    if device == "cuda" and not quick:
        return {}, 8, 1024, 4
    return dict(vocab=256, n_ctx=32, d_model=32, n_layer=2, n_head=2), 2, 32, 2


def train_one(impl, config, data, device):
    torch.manual_seed(0)
    model = GPT(**config).to(device)
    optimi_run = None
    if impl == "standard AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    elif impl == "torch-optimi accumulation":
        optimi_run = peers.OptimiAccumulation(model, K, lr=3e-4, triton=device == "cuda")
    else:
        _, mode, second_moment = impl.split()
        opt = AccumAdamW(model.parameters(), lr=3e-4, accum_steps=K,
                         second_moment=second_moment, fold_in_backward=mode == "hook")
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    backward_s, start, loss = 0.0, None, None
    for i, (x, y) in enumerate(data):
        if i == K:  # time from the second window on
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = model(x, y)
        synchronize(device)
        begin = time.perf_counter()
        if optimi_run is not None:
            optimi_run.before_backward()
            loss.backward()
        elif impl == "standard AdamW":
            (loss / K).backward()
        else:
            loss.backward()
        synchronize(device)
        backward_s += time.perf_counter() - begin if i >= K else 0.0
        if optimi_run is None and (impl != "standard AdamW" or (i + 1) % K == 0):
            opt.step()
            opt.zero_grad()
    synchronize(device)
    elapsed = time.perf_counter() - start
    if optimi_run is not None:
        optimi_run.remove()
    elif impl != "standard AdamW":
        opt.remove_hooks()
    micro_steps = len(data) - K
    return dict(peak=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                tokens_per_s=micro_steps * data[0][0].numel() / elapsed,
                backward_ms=backward_s / micro_steps * 1e3, loss=loss.item(),
                params=sum(p.numel() for p in model.parameters()))


def impls():
    return [i for i in IMPLS if i != "torch-optimi accumulation" or peers.optimi() is not None]


def run(device, quick, results, progress):
    if peers.optimi() is None:
        results.note(SUITE, peers.MISSING)
    config, batch, seq, windows = setup(device, quick)
    gen = torch.Generator().manual_seed(0)
    vocab = config.get("vocab", 50257)
    data = [(x[:, :-1].to(device), x[:, 1:].to(device)) for x in
            torch.randint(0, vocab, (windows * K, batch, seq + 1), generator=gen)]
    case = f"{'gpt2-124M' if not config else 'gpt-tiny'} k={K} {batch}x{seq}"
    rows = {}
    for impl in impls():
        row = peers.guarded(impl == "torch-optimi accumulation", results, SUITE, progress,
                            impl, lambda: train_one(impl, config, data, device))
        if row is None:
            continue
        rows[impl] = row
        if row["peak"] is not None:
            results.add(SUITE, case, impl, "peak_memory", row["peak"] / 2 ** 30, "GiB")
        results.add(SUITE, case, impl, "tokens_per_s", row["tokens_per_s"], "tokens/s")
        results.add(SUITE, case, impl, "backward_ms", row["backward_ms"], "ms")
        results.add(SUITE, case, impl, f"loss_after_{windows}_windows", row["loss"], "nats")
        progress.advance(f"{SUITE}: {impl}")
    base = rows["standard AdamW"]
    for impl, row in rows.items():
        results.add(SUITE, case, impl, "throughput_vs_standard",
                    row["tokens_per_s"] / base["tokens_per_s"], "fraction")
        if row["peak"] is not None:
            saved = (base["peak"] - row["peak"]) / (4 * row["params"])
            results.add(SUITE, case, impl, "fp32_grad_bytes_saved", saved, "fraction")
    if device != "cuda":
        results.note(SUITE, "no GPU: peak memory is not measured; CPU timings of a tiny model "
                            "say nothing about GPU throughput")


def work(device, quick):
    return len(impls())
