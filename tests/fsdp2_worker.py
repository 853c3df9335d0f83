"""What each rank of test_fsdp2.py runs (in its own process, gloo on loopback, FSDP2 on CPU).

Data: micro-step i has one global batch (GLOBAL_ROWS rows, the same for every world size); rank r
takes chunk r of it (GLOBAL_ROWS is divisible by 2 and 3, so the chunks are equal) and its loss
is the mean over its own rows. FSDP2's reduce-scatter averages over ranks, so every micro-step's
rank-averaged gradient is the gradient of the global batch's mean loss whatever the world size:
a 2-rank and a 3-rank run (and a single process on the global batch) see the same gradients.

Every scenario catches its own exception and stores it as a string, so one failing scenario
neither hangs nor hides the others; the parent asserts on the strings."""
import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from accumopt import AccumAdamW, AccumSGDM

K, WINDOWS = 3, 2
GLOBAL_ROWS = 12
DCP_WINDOWS = 3                  # the checkpoint runs: 3 windows, saved at SAVE_POINTS
SAVE_POINTS = {"mid-window": 4, "boundary": 3}    # micro-steps done when saved
RESHARD_POINT = "boundary"       # the 2-rank checkpoint the 3-rank run loads
MAX_NORM = 0.3
TORCH_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

# name: (accumopt class, its kwargs, torch.optim class, its kwargs)
EXACT = {
    "sgd-nesterov": (AccumSGDM, dict(lr=0.1, momentum=0.9, nesterov=True),
                     torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgdm": (AccumSGDM, dict(lr=0.1, momentum=0.9),
             torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adamw-square_of_mean": (AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean"),
                             torch.optim.AdamW, dict(lr=1e-2)),
}
MEAN_OF_SQUARES = (AccumAdamW, dict(lr=1e-2))    # weight_decay 1e-2, betas, eps: defaults
CLIPPED = (AccumSGDM, dict(lr=0.1, momentum=0.9, nesterov=True, max_grad_norm=MAX_NORM),
           torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))
DCP_OPTS = {
    "adamw-square_of_mean": (AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean")),
    "sgdm": (AccumSGDM, dict(lr=0.1, momentum=0.9)),
}
# step: accumopt's loop (loss per micro-batch, step() every micro-batch, accum_reduction mean);
# fold: the same loop with fold_in_backward; window: the framework's loop (loss / K, step()
# after K backwards) with fold_in_backward and step_per_window.
MODES = {
    "step": dict(),
    "fold": dict(fold_in_backward=True),
    "window": dict(fold_in_backward=True, step_per_window=True),
}


def plain_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def fsdp_model(seed=0):
    model = plain_model(seed)
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def global_batch(i):
    gen = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(GLOBAL_ROWS, 8, generator=gen, dtype=torch.float64),
            torch.randn(GLOBAL_ROWS, 4, generator=gen, dtype=torch.float64))


def local_batch(world_size, rank, i):
    x, y = global_batch(i)
    return x.chunk(world_size)[rank], y.chunk(world_size)[rank]


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def full(value):
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if torch.is_tensor(value):
        return value.detach().clone()
    return value


def full_params(model):
    with torch.no_grad():
        return [full(p) for p in model.parameters()]


def full_state(model, opt):
    """(param name, key) -> the state value, DTensors gathered (a collective: the same order on
    every rank), plus its kind."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            kind = "DTensor" if isinstance(value, DTensor) else type(value).__name__
            out[(name, key)] = (full(value), kind)
    return out


def describe(err):
    """The exception as one string: type, message (a CheckpointException's per-rank causes too)
    and where it was raised."""
    text = f"{type(err).__name__}: {err}"
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for r, failure in failures.items():
            inner = failure[0] if isinstance(failure, tuple) else failure
            inner = getattr(inner, "exception", inner)
            text += f" | rank {r} cause {type(inner).__name__}: {inner}"
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        where = [f for f in frames if "accumopt" in f.filename] or frames
        f = where[-1]
        text += f" [at {os.path.basename(f.filename)}:{f.lineno} in {f.name}]"
    return text


def guarded(fn, *args):
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:      # CheckpointException derives from BaseException
        return describe(err)


# ----- the loops ------------------------------------------------------------------------------

def torch_loop(rank, world_size, torch_cls, torch_kwargs, no_sync=False, clip=None):
    """Standard accumulation with torch.optim on an FSDP2 model: loss / K per micro-step, step()
    after K; reduce-scatter every micro-step, or set_requires_gradient_sync(False) until the last
    micro-step. With clip, clip_grad_norm_ on the accumulated .grad before each step."""
    model = fsdp_model()
    opt = torch_cls(model.parameters(), **torch_kwargs)
    snapshots, norms = [], []
    for i in range(WINDOWS * K):
        last = (i + 1) % K == 0
        if no_sync:
            model.set_requires_gradient_sync(last)
        x, y = local_batch(world_size, rank, i)
        (loss_of(model, x, y) / K).backward()
        if last:
            if clip is not None:
                norms.append(full(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad()
            snapshots.append(full_params(model))
    return {"params": snapshots, "norms": norms}


def accum_micro_step(model, opt, rank, world_size, i, mode, grads_after_backward=None):
    x, y = local_batch(world_size, rank, i)
    loss = loss_of(model, x, y)
    (loss / K if mode == "window" else loss).backward()
    if grads_after_backward is not None:
        grads_after_backward.append([name for name, p in model.named_parameters()
                                     if p.grad is not None])
    if mode != "window" or (i + 1) % K == 0:
        opt.step()
        opt.zero_grad()


def accum_loop(rank, world_size, cls, kwargs, mode):
    model = fsdp_model()
    opt = cls(model.parameters(), accum_steps=K, backend="torch", **MODES[mode], **kwargs)
    snapshots, norms, updated, grads_after_backward = [], [], [], []
    try:
        for i in range(WINDOWS * K):
            accum_micro_step(model, opt, rank, world_size, i, mode,
                             grads_after_backward if mode != "step" else None)
            if (i + 1) % K == 0:
                updated.append((opt.updated, opt.num_updates))
                snapshots.append(full_params(model))
                if kwargs.get("max_grad_norm") is not None:
                    norms.append(full(opt.grad_norm))
    finally:
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
    return {"params": snapshots, "norms": norms, "updated": updated,
            "grads_after_backward": grads_after_backward}


# ----- checkpoints ------------------------------------------------------------------------------

def dcp_resume(rank, world_size, name, point, ckpt_dir):
    """Uninterrupted run of DCP_WINDOWS windows in step mode, saved (model and optimizer, the
    standard recipe) after SAVE_POINTS[point] micro-steps; then a fresh model (another init,
    loaded from the checkpoint) and a fresh optimizer resume from the checkpoint."""
    cls, kwargs = DCP_OPTS[name]
    save_at = SAVE_POINTS[point]
    model = fsdp_model()
    opt = cls(model.parameters(), accum_steps=K, backend="torch", **kwargs)
    out = {"windows": []}
    for i in range(DCP_WINDOWS * K):
        accum_micro_step(model, opt, rank, world_size, i, "step")
        if i + 1 == save_at:
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=ckpt_dir)
            out["saved_position"] = (opt.micro_step, opt.num_updates)
            out["saved_state"] = full_state(model, opt)
            out["saved_params"] = full_params(model)
        if (i + 1) % K == 0:
            out["windows"].append(full_params(model))
    out["final"] = full_params(model)
    resumed = load_and_continue(rank, world_size, cls, kwargs, ckpt_dir, save_at)
    out.update(resumed)
    return out


def load_and_continue(rank, world_size, cls, kwargs, ckpt_dir, save_at):
    model = fsdp_model(seed=1)      # other values: the checkpoint must bring the parameters
    opt = cls(model.parameters(), accum_steps=K, backend="torch", **kwargs)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    out = {"loaded_position": (opt.micro_step, opt.num_updates),
           "loaded_state": full_state(model, opt), "loaded_params": full_params(model),
           "resumed_windows": {}}
    for i in range(save_at, DCP_WINDOWS * K):
        accum_micro_step(model, opt, rank, world_size, i, "step")
        if (i + 1) % K == 0:
            out["resumed_windows"][(i + 1) // K - 1] = full_params(model)
    out["resumed_final"] = full_params(model)
    return out


def ckpt_dir_of(out_dir, name, point):
    return os.path.join(out_dir, f"dcp-{name}-{point}")


# ----- the worker ---------------------------------------------------------------------------

def run_all(rank, world_size, out_dir, reshard_from):
    results = {}
    for name, (_, _, torch_cls, torch_kwargs) in EXACT.items():
        for no_sync in (False, True):
            results[("torch", name, no_sync)] = guarded(
                torch_loop, rank, world_size, torch_cls, torch_kwargs, no_sync)
    for name, (cls, kwargs, _, _) in EXACT.items():
        for mode in MODES:
            results[("accum", name, mode)] = guarded(accum_loop, rank, world_size, cls, kwargs,
                                                     mode)
    for mode in MODES:
        results[("accum", "adamw-mean_of_squares", mode)] = guarded(
            accum_loop, rank, world_size, *MEAN_OF_SQUARES, mode)
    cls, kwargs, torch_cls, torch_kwargs = CLIPPED
    for no_sync in (False, True):
        results[("torch", "clipped", no_sync)] = guarded(
            torch_loop, rank, world_size, torch_cls, torch_kwargs, no_sync, MAX_NORM)
    for mode in MODES:
        results[("accum", "clipped", mode)] = guarded(accum_loop, rank, world_size, cls, kwargs,
                                                      mode)
    for name in DCP_OPTS:
        for point in SAVE_POINTS:
            results[("dcp", name, point)] = guarded(dcp_resume, rank, world_size, name, point,
                                                    ckpt_dir_of(out_dir, name, point))
    if reshard_from is not None:
        for name, (cls, kwargs) in DCP_OPTS.items():
            ckpt = ckpt_dir_of(reshard_from, name, RESHARD_POINT)

            def reshard(cls=cls, kwargs=kwargs, ckpt=ckpt):
                if not os.path.isdir(ckpt):
                    raise FileNotFoundError(f"the 2-rank run saved no checkpoint at {ckpt}")
                return load_and_continue(rank, world_size, cls, kwargs, ckpt,
                                         SAVE_POINTS[RESHARD_POINT])
            results[("reshard", name)] = guarded(reshard)
    return results


def worker(rank, world_size, port, out_dir, reshard_from=None):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = run_all(rank, world_size, out_dir, reshard_from)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
