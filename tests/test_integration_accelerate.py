"""accelerate.Accelerator driving accumopt with step_per_window=True: the README's recipe.

Accelerator(gradient_accumulation_steps=k) and the usual loop (`with accelerator.accumulate(
model): accelerator.backward(loss); opt.step(); sched.step(); opt.zero_grad()`), no
accelerator.clip_grad_norm_, and an accumopt optimizer with accum_steps=k,
fold_in_backward=True, step_per_window=True (optionally max_grad_norm=c). The reference is the
same loop with torch.optim on Accelerate's own .grad accumulation (and, for window clipping,
accelerator.clip_grad_norm_(params, c) on the sync micro-batch): parameters after every window,
the lr of every update, the clipped norm, save_state/load_state mid-window and at a boundary,
and on two gloo ranks under DDP the refusal of fold_in_backward on every rank. 7 micro-batches
of batch size 1 with k=3 give windows of 3, 3 and a short 1 (Accelerate syncs at the end of
the dataloader) per epoch.
"""
import datetime
import os
import socket
import time
import traceback

import pytest

accelerate = pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from accumopt import AccumSGDM  # noqa: E402

from integration_setup import (CLIP_VARIANTS, EPOCHS, K, LR, N, RTOL64,  # noqa: E402
                               VARIANTS, WINDOWS)
from integration_setup import assert_params_close as _assert_params_close  # noqa: E402


def reset_accelerate_state():
    """Accelerator keeps process-wide shared state (AcceleratorState, GradientState): a fresh
    one per run, as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    rng = torch.random.get_rng_state()  # the runs seed the global RNG: give it back
    reset_accelerate_state()
    yield
    reset_accelerate_state()
    torch.random.set_rng_state(rng)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, dtype=torch.float64), nn.Tanh(),
                         nn.Linear(5, 2, dtype=torch.float64))


def make_loader():
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = 3 * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=1, shuffle=False)


def lr_lambda(update):
    """Linear warmup over 2 updates, then linear decay over the rest: one step per window."""
    return (update + 1) / 2 if update < 2 else max(0.0, (WINDOWS - update) / (WINDOWS - 2))


def accum_kwargs(kwargs, **extra):
    return dict(kwargs, accum_steps=K, fold_in_backward=True, step_per_window=True, **extra)


class Run:
    """What one training run recorded at each sync micro-batch (a window's end)."""

    def __init__(self):
        self.params, self.lrs, self.clip_norms, self.opt_norms, self.grads_left = \
            [], [], [], [], []
        self.positions = []  # per micro-batch: (global index, opt.micro_step)


def train(opt_cls, opt_kwargs, *, clip=None, save_at=None, resume=None):
    """The Accelerate loop. ``clip``: accelerator.clip_grad_norm_ at the sync micro-batch (the
    torch.optim reference). ``save_at``: {global micro-batch index: dir} to save_state after
    that micro-batch. ``resume``: (dir, micro-batches done) to load_state and continue."""
    reset_accelerate_state()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    model = make_model()
    opt = opt_cls(model.parameters(), lr=LR, **opt_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    model, popt, loader, psched = accelerator.prepare(model, opt, make_loader(), sched)
    done = 0
    if resume is not None:
        accelerator.load_state(resume[0])
        done = resume[1]
    run = Run()
    run.start_micro_step = getattr(opt, "micro_step", None)
    run.optimizer = opt
    micro = done
    for epoch in range(done // N, EPOCHS):
        skip = done - epoch * N
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        for x, y in epoch_loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    run.grads_left.append([n for n, p in model.named_parameters()
                                           if p.grad is not None])
                    if clip is not None:
                        norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                        run.clip_norms.append(norm.detach().clone())
                    run.lrs.append([float(g["lr"]) for g in opt.param_groups])
                popt.step()
                psched.step()
                popt.zero_grad()
                if accelerator.sync_gradients:
                    run.params.append({n: p.detach().clone() for n, p in
                                       model.named_parameters()})
                    norm = getattr(opt, "grad_norm", None)
                    run.opt_norms.append(None if norm is None else
                                         torch.as_tensor(norm).detach().clone())
            micro += 1
            run.positions.append((micro, getattr(opt, "micro_step", None)))
            if save_at and micro in save_at:
                accelerator.save_state(save_at[micro])
    run.final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return run


def assert_params_close(got, want, what, tol=RTOL64):
    _assert_params_close("Accelerate", got, want, what, tol)


def assert_runs_match(mine, ref, label, windows=WINDOWS, first=0):
    assert len(mine.params) == len(ref.params) == windows, (
        f"Accelerate, {label}: {len(mine.params)} accumopt updates, {len(ref.params)} "
        f"torch.optim updates, expected {windows} (windows 3, 3, 1 per epoch)")
    assert all(not left for left in mine.grads_left), (
        f"Accelerate, {label}: .grad left at the sync micro-batch (fold_in_backward should "
        f"free every gradient): {mine.grads_left}")
    for w, (got, want) in enumerate(zip(mine.params, ref.params), first):
        kind = "short" if w % 3 == 2 else "full"
        assert_params_close(got, want, f"{label}, after window {w} ({kind})")
    assert mine.lrs == ref.lrs, (
        f"Accelerate, {label}: lr per update differs: accumopt {mine.lrs}, torch.optim "
        f"{ref.lrs}")
    assert_params_close(mine.final, ref.final, f"{label}, final")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_accelerate_accumulation_equals_torch_optim_per_window(variant):
    acc_cls, acc_kw, torch_cls, torch_kw = VARIANTS[variant]
    mine = train(acc_cls, accum_kwargs(acc_kw))
    ref = train(torch_cls, torch_kw)
    assert_runs_match(mine, ref, variant)
    assert mine.optimizer.num_updates == WINDOWS, (
        f"Accelerate, {variant}: accumopt counted {mine.optimizer.num_updates} updates")
    assert [lrs[0] for lrs in mine.lrs] == pytest.approx(
        [LR * lr_lambda(u) for u in range(WINDOWS)]), mine.lrs
    start = make_model().state_dict()
    moved = max((mine.final[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3, f"Accelerate, {variant}: parameters barely moved ({moved})"


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
def test_accelerate_window_clipping_equals_accelerator_clip_grad_norm(variant):
    acc_cls, acc_kw, torch_cls, torch_kw = CLIP_VARIANTS[variant]
    clip = 2.5
    ref = train(torch_cls, torch_kw, clip=clip)
    norms = [float(n) for n in ref.clip_norms]
    assert len(norms) == WINDOWS
    assert min(norms) < clip < max(norms), f"Accelerate: choose clip inside {norms}"
    mine = train(acc_cls, accum_kwargs(acc_kw, max_grad_norm=clip))
    for w, (got, want) in enumerate(zip(mine.opt_norms, ref.clip_norms)):
        assert got is not None, "Accelerate: accumopt has no opt.grad_norm"
        assert got.dim() == 0, f"Accelerate: opt.grad_norm has shape {tuple(got.shape)}"
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"Accelerate, {variant}, window {w}: "
                                                 f"opt.grad_norm vs clip_grad_norm_: {m}")
    assert_runs_match(mine, ref, f"{variant} clipped at {clip}")


# save_state points: {name: global micro-batch index it is saved after}. Windows end after
# micro-batches 3, 6, 7 | 10, 13, 14: "mid" is inside window 1 (one backward folded),
# "boundary" after window 1 (the short window next), "epoch2-mid" inside window 3 (two folded).
SAVE_POINTS = {"mid": 4, "boundary": 6, "epoch2-mid": 9}
WINDOW_END_MICRO = (3, 6, 7, 10, 13, 14)


def resume_from_save_state(tmp_path, variant, point):
    """The uninterrupted run, saving at ``point`` (checked against torch.optim), and a fresh
    Accelerator, model and optimizer that load_state there and go on with the remaining
    batches; and the number of windows done before it."""
    acc_cls, acc_kw, torch_cls, torch_kw = VARIANTS[variant]
    micro = SAVE_POINTS[point]
    full = train(acc_cls, accum_kwargs(acc_kw), save_at={micro: tmp_path / point})
    ref = train(torch_cls, torch_kw)
    assert_runs_match(full, ref, f"{variant} uninterrupted (saving)")
    resumed = train(acc_cls, accum_kwargs(acc_kw), resume=(tmp_path / point, micro))
    return full, resumed, sum(1 for end in WINDOW_END_MICRO if end <= micro)


@pytest.mark.parametrize("point", list(SAVE_POINTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_accelerate_save_state_load_state_equals_the_uninterrupted_run(tmp_path, variant, point):
    """Mid-window and at a boundary: the optimizer's state_dict carries the open window's
    folds, Accelerate's state its own window position (its step counter)."""
    full, resumed, first = resume_from_save_state(tmp_path, variant, point)
    label = f"{variant} resumed after micro-batch {SAVE_POINTS[point]} ({point})"
    assert len(resumed.params) == WINDOWS - first, (
        f"Accelerate, {label}: {len(resumed.params)} updates after resuming")
    for w, got in enumerate(resumed.params, first):
        assert_params_close(got, full.params[w], f"{label}, window {w}")
    assert resumed.lrs == full.lrs[first:], (
        f"Accelerate, {label}: lr {resumed.lrs} vs uninterrupted {full.lrs[first:]}")
    assert resumed.optimizer.num_updates == WINDOWS, (
        f"Accelerate, {label}: num_updates {resumed.optimizer.num_updates}")
    assert_params_close(resumed.final, full.final, f"{label}, final")


@pytest.mark.parametrize("point", list(SAVE_POINTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_accelerate_resumed_optimizer_knows_its_window_position(tmp_path, variant, point):
    """After load_state, opt.micro_step (the backward passes folded into the open window,
    what the "backward beyond accum_steps" check counts) after every micro-batch equals the
    uninterrupted run's: a state_dict saved between a backward and step(), as every
    mid-window save_state is with step_per_window, must carry that backward."""
    full, resumed, _ = resume_from_save_state(tmp_path, variant, point)
    saved = full.positions[SAVE_POINTS[point] - 1][1]
    assert resumed.start_micro_step == saved, (
        f"Accelerate, {variant} resumed after micro-batch {SAVE_POINTS[point]} ({point}): "
        f"opt.micro_step is {resumed.start_micro_step} after load_state, {saved} when saved")
    tail = full.positions[SAVE_POINTS[point]:]
    assert resumed.positions == tail, (
        f"Accelerate, {variant} resumed after micro-batch {SAVE_POINTS[point]} ({point}): "
        f"(micro-batch, opt.micro_step) resumed {resumed.positions}, uninterrupted {tail}")


# ----- DDP on two gloo ranks ------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world_size, port, out_dir):
    """One rank: Accelerate picks up the gloo process group this rank initialised (it needs
    the launcher's env vars to see a MULTI_CPU run), wraps the model in DDP at prepare(), and
    the first backward must refuse fold_in_backward before anything is folded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=60))
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        result["distributed_type"] = str(accelerator.distributed_type)
        result["num_processes"] = accelerator.num_processes
        model = make_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = AccumSGDM(model.parameters(), lr=LR, momentum=0.9, accum_steps=2,
                        fold_in_backward=True, step_per_window=True)
        loader = DataLoader(TensorDataset(torch.randn(8, 4, dtype=torch.float64),
                                          torch.randn(8, 2, dtype=torch.float64)), batch_size=1)
        model, popt, loader = accelerator.prepare(model, opt, loader)
        result["wrapper"] = type(model).__name__
        error = None
        for x, y in loader:
            try:
                with accelerator.accumulate(model):
                    accelerator.backward(nn.functional.mse_loss(model(x), y))
                    popt.step()
                    popt.zero_grad()
            except RuntimeError as exc:
                error = exc
            break
        result["error"] = None if error is None else f"{type(error).__name__}: {error}"
        inner = accelerator.unwrap_model(model)
        result["moved"] = [n for n, p in inner.named_parameters()
                           if not torch.equal(p.detach(), before[n])]
        result["state"] = {k: sorted(v) for k, v in enumerate(opt.state.values()) if v}
        result["micro_step"] = opt.micro_step
        result["num_updates"] = opt.num_updates
        dist.barrier()  # no collective left pending by the refusal
        result["barrier"] = True
    except Exception:  # noqa: BLE001 -- report everything to the parent
        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_accelerate_ddp_on_two_gloo_ranks_refuses_fold_in_backward_on_every_rank(tmp_path):
    world_size = 2
    context = mp.start_processes(ddp_worker, args=(world_size, free_port(), str(tmp_path)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail("Accelerate DDP ranks did not finish (a hang after the refusal?)")
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "crash" not in result, f"Accelerate DDP, rank {rank} crashed:\n{result['crash']}"
        assert result["num_processes"] == world_size and "MULTI_CPU" in \
            result["distributed_type"], f"Accelerate DDP, rank {rank}: {result}"
        assert result["wrapper"] == "DistributedDataParallel", (
            f"Accelerate DDP, rank {rank}: prepare() gave a {result['wrapper']}")
        assert result["error"] is not None and "DistributedDataParallel" in result["error"], (
            f"Accelerate DDP, rank {rank}: fold_in_backward under DDP was not refused with a "
            f"RuntimeError naming DistributedDataParallel: {result['error']}")
        assert result["error"].startswith("RuntimeError"), result["error"]
        assert not result["moved"] and not result["state"], (
            f"Accelerate DDP, rank {rank}: something was folded or moved before the "
            f"refusal: moved {result['moved']}, state {result['state']}")
        assert result["micro_step"] == 0 and result["num_updates"] == 0, (
            f"Accelerate DDP, rank {rank}: micro_step {result['micro_step']}, "
            f"num_updates {result['num_updates']} after the refusal")
        assert result["barrier"], f"Accelerate DDP, rank {rank}: barrier after the refusal"
