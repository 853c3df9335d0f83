"""convergence: a byte-level language model (benchmarks.gpt) on text every Python install ships,
the standard library's own .py sources, trained on the same micro-batches in the same order by
each method below; the mean training loss of every window and the final loss on held-out text.

The methods:

* standard accumulation: loss / k per micro-batch, torch.optim.AdamW once per window (the
  large-batch reference);
* AccumAdamW square_of_mean (exact: must track the reference) and mean_of_squares (Su's rule:
  v ≥ Ḡ², so smaller steps at the same lr);
* torch-optimi's optimizer accumulation (an EMA step of its moments per micro-batch);
* Su's β̃ recipe: torch.optim.AdamW stepped every micro-batch with β → 1-(1-β)/k and lr zero
  between updates;
* small-batch AdamW: torch.optim.AdamW stepped every micro-batch (k times the updates);
* each new family against its own standard accumulation (loss / k, the optimizer stepped once
  per window on .grad): Lion and Tiger (the standard run steps AccumLion / AccumTiger with
  accum_steps=1, which is the rule itself), Muon for the hidden matrices with AdamW for the
  rest (torch.optim.Muon + torch.optim.AdamW against AccumMuon + AccumAdamW square_of_mean,
  both stepped in one loop). The accumulating run must end on its standard run's loss."""
import glob
import os
import sysconfig

import torch

from accumopt import AccumAdamW, AccumLion, AccumMuon, AccumTiger, tiger_param_groups
from benchmarks import peers
from benchmarks.gpt import GPT

SUITE = "convergence"
IMPLS = ["standard accumulation AdamW", "AccumAdamW square_of_mean",
         "AccumAdamW mean_of_squares", "torch-optimi accumulation", "Su beta-tilde AdamW",
         "small-batch AdamW", "standard accumulation Lion", "AccumLion",
         "standard accumulation Tiger", "AccumTiger", "standard accumulation Muon+AdamW",
         "AccumMuon+AccumAdamW"]
# Each family's lr as a multiple of AdamW's: Lion's sign steps want a smaller one, Tiger's
# RMS-relative steps (lr·RMS(θ) per element) and Muon's orthogonalised ones a larger one.
FAMILY_LR = {"Lion": 0.2, "Tiger": 10.0, "Muon": 10.0}


class Both:
    """Two optimizers stepped as one (Muon's matrices, AdamW's rest), as in the README."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad()


def family_optimizer(impl, model, lr, k):
    """The optimizer of a family run: accum_steps=k for accumopt's, 1 for the standard run (an
    accumopt optimizer with accum_steps=1 steps the rule itself on .grad)."""
    family = impl.split()[-1].replace("Accum", "").split("+")[0]
    steps = 1 if impl.startswith("standard") else k
    if family == "Lion":
        return AccumLion(model.parameters(), lr=lr * FAMILY_LR["Lion"], accum_steps=steps)
    if family == "Tiger":
        return AccumTiger(tiger_param_groups(model), lr=lr * FAMILY_LR["Tiger"],
                          accum_steps=steps)
    matrices = [p for name, p in model.named_parameters()
                if p.ndim == 2 and name.startswith("blocks.")]
    rest = [p for name, p in model.named_parameters()
            if not (p.ndim == 2 and name.startswith("blocks."))]
    if impl.startswith("standard"):
        return Both(torch.optim.Muon(matrices, lr=lr * FAMILY_LR["Muon"]),
                    torch.optim.AdamW(rest, lr=lr))
    return Both(AccumMuon(matrices, lr=lr * FAMILY_LR["Muon"], accum_steps=k),
                AccumAdamW(rest, lr=lr, accum_steps=k, second_moment="square_of_mean"))


def setup(device, quick):
    if device == "cuda" and not quick:
        return dict(n_ctx=256, d_model=256, n_layer=4, n_head=4), dict(
            batch=16, k=8, windows=150, lr=1e-3, corpus=8_000_000)
    return dict(n_ctx=64, d_model=96, n_layer=3, n_head=4), dict(
        batch=8, k=4, windows=120, lr=2e-3, corpus=2_000_000)


def corpus(max_bytes):
    """The standard library's top-level .py files, in name order, as bytes."""
    data = bytearray()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            data += f.read()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(bytes(data[:max_bytes]), dtype=torch.uint8).long()


def batches(tokens, seq, batch, count, seed):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq - 1, (count, batch), generator=gen)
    for row in starts:
        window = torch.stack([tokens[s:s + seq + 1] for s in row.tolist()])
        yield window[:, :-1], window[:, 1:]


def train_one(impl, config, hp, train_tokens, val_tokens, device):
    torch.manual_seed(0)
    model = GPT(vocab=256, **config).to(device)
    k, lr, seq = hp["k"], hp["lr"], config["n_ctx"]
    optimi_run = None
    if impl == "AccumAdamW square_of_mean" or impl == "AccumAdamW mean_of_squares":
        opt = AccumAdamW(model.parameters(), lr=lr, accum_steps=k,
                         second_moment=impl.split()[1])
    elif impl == "torch-optimi accumulation":
        optimi_run = peers.OptimiAccumulation(model, k, lr=lr, triton=device == "cuda")
    elif impl.startswith("standard accumulation") and impl != "standard accumulation AdamW" \
            or impl.startswith("AccumLion") or impl.startswith("AccumTiger") \
            or impl.startswith("AccumMuon"):
        opt = family_optimizer(impl, model, lr, k)
    elif impl == "Su beta-tilde AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(1 - 0.1 / k, 1 - 0.001 / k))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    curve, window_losses = [], []
    stream = batches(train_tokens, seq, hp["batch"], hp["windows"] * k, seed=1)
    for i, (x, y) in enumerate(stream):
        last = (i + 1) % k == 0
        loss = model(x.to(device), y.to(device))
        window_losses.append(loss.item())
        if impl.startswith("standard accumulation"):
            (loss / k).backward()
            if last:
                opt.step()
                opt.zero_grad()
        elif optimi_run is not None:
            optimi_run.before_backward()
            loss.backward()
        else:
            if impl == "Su beta-tilde AdamW":
                for group in opt.param_groups:
                    group["lr"] = lr if last else 0.0
            loss.backward()
            opt.step()
            opt.zero_grad()
        if last:
            curve.append(sum(window_losses) / k)
            window_losses = []
    if optimi_run is not None:
        optimi_run.remove()
    with torch.no_grad():
        val = [model(x.to(device), y.to(device)).item()
               for x, y in batches(val_tokens, seq, hp["batch"], 8, seed=2)]
    return curve, sum(val) / len(val)


def impls():
    return [i for i in IMPLS if (i != "torch-optimi accumulation" or peers.optimi() is not None)
            and ("Muon" not in i or hasattr(torch.optim, "Muon"))]


def run(device, quick, results, progress):
    if peers.optimi() is None:
        results.note(SUITE, peers.MISSING)
    if device == "cpu":
        # Subnormal floats are slow on CPUs (GPUs flush them on their fast paths): without this
        # the sign-based runs take ten times as long. It applies to every method alike.
        results.note(SUITE, "CPU run with subnormals flushed to zero (torch.set_flush_denormal)")
        flushed = torch.set_flush_denormal(True)
        try:
            _run(device, quick, results, progress)
        finally:
            if flushed:
                torch.set_flush_denormal(False)
        return
    _run(device, quick, results, progress)


def _run(device, quick, results, progress):
    config, hp = setup(device, quick)
    tokens = corpus(hp["corpus"])
    split = int(len(tokens) * 0.95)
    case = (f"stdlib bytes, {config['n_layer']}x{config['d_model']} GPT, "
            f"k={hp['k']} x {hp['batch']}x{config['n_ctx']}, {hp['windows']} windows")
    for impl in impls():
        outcome = peers.guarded(impl == "torch-optimi accumulation", results, SUITE, progress,
                             impl, lambda: train_one(impl, config, hp, tokens[:split],
                                                     tokens[split:], device))
        if outcome is None:
            continue
        curve, val = outcome
        for window, loss in enumerate(curve):
            results.add(SUITE, f"window {window + 1}", impl, "train_loss", loss, "nats")
        results.add(SUITE, case, impl, "final_val_loss", val, "nats")
        results.add(SUITE, case, impl, "final_train_loss", curve[-1], "nats")
        progress.advance(f"{SUITE}: {impl}")


def work(device, quick):
    return len(impls())
