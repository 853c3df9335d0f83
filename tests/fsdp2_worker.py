"""What each rank of test_fsdp2.py runs (in its own process, gloo on loopback, FSDP2 on CPU).

Data: micro-step i has one global batch (GLOBAL_ROWS rows, the same for every world size); rank r
takes chunk r of it (GLOBAL_ROWS is divisible by 2 and 3, so the chunks are equal) and its loss
is the mean over its own rows. FSDP2's reduce-scatter averages over ranks, so every micro-step's
rank-averaged gradient is the gradient of the global batch's mean loss whatever the world size:
a 2-rank and a 3-rank run (and a single process on the global batch) see the same gradients.

Three model setups: DOUBLE (float64, nested fully_shard: each Linear and the root) for the torch
path; FP32, the same in float32, for the Triton kernels (which take fp32 / bf16 / fp16 local
shards); TIED_MP, an embedding tied to the output head, nested wrapping and a mixed-precision
policy (bf16 compute, fp32 reduce, fp32 shards), with k = 2 so that the references' loss / k is
exact in bf16 as well.

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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from accumopt import AccumAdam, AccumAdamW, AccumSGDM

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
    "sgd": (AccumSGDM, dict(lr=0.1, momentum=0.0, weight_decay=1e-2),
            torch.optim.SGD, dict(lr=0.1, weight_decay=1e-2)),
    "adam-square_of_mean": (AccumAdam, dict(lr=1e-2, weight_decay=1e-2,
                                            second_moment="square_of_mean"),
                            torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw-square_of_mean": (AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean"),
                             torch.optim.AdamW, dict(lr=1e-2)),
}
TIED_MP_OPTS = ("adamw-square_of_mean", "sgd-nesterov")
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


class Setup:
    """A model and its data: ``make(seed)`` the fully_shard model, ``plain(seed)`` the same
    model unsharded, ``batch(world_size, rank, i)`` rank r's chunk of micro-step i's global
    batch, ``loss(model, x, y)`` its mean loss, ``k`` the micro-steps per window."""

    def __init__(self, name, plain, shard, data, loss, k):
        self.name, self.plain, self._shard, self._data, self.loss, self.k = \
            name, plain, shard, data, loss, k

    def make(self, seed=0):
        return self._shard(self.plain(seed))

    def global_batch(self, i):
        return self._data(torch.Generator().manual_seed(1000 + i))

    def batch(self, world_size, rank, i):
        x, y = self.global_batch(i)
        return x.chunk(world_size)[rank], y.chunk(world_size)[rank]


def mlp(dtype):
    def plain(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    return plain


def shard_each_linear(model):
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def mlp_data(dtype):
    def data(gen):
        return (torch.randn(GLOBAL_ROWS, 8, generator=gen, dtype=dtype),
                torch.randn(GLOBAL_ROWS, 4, generator=gen, dtype=dtype))
    return data


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


class TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> head, the head's weight the embedding's (one parameter)."""
    VOCAB, WIDTH, SEQ = 10, 8, 3

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, self.WIDTH)
        self.mid = nn.Linear(self.WIDTH, self.WIDTH)
        self.head = nn.Linear(self.WIDTH, self.VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def tied_plain(seed=0):
    torch.manual_seed(seed)
    return TiedLM()


def tied_shard(model):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.mid, mp_policy=policy)
    fully_shard(model, mp_policy=policy)      # the tied weight belongs to the root
    return model


def tied_data(gen):
    shape = (GLOBAL_ROWS, TiedLM.SEQ)
    return (torch.randint(0, TiedLM.VOCAB, shape, generator=gen),
            torch.randint(0, TiedLM.VOCAB, shape, generator=gen))


def tied_loss(model, x, y):
    return nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


DOUBLE = Setup("double", mlp(torch.float64), shard_each_linear, mlp_data(torch.float64), mse, K)
FP32 = Setup("fp32", mlp(torch.float32), shard_each_linear, mlp_data(torch.float32), mse, K)
TIED_MP = Setup("tied-mp", tied_plain, tied_shard, tied_data, tied_loss, 2)


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

def torch_loop(rank, world_size, torch_cls, torch_kwargs, no_sync=False, clip=None,
               setup=DOUBLE):
    """Standard accumulation with torch.optim on an FSDP2 model: loss / k per micro-step, step()
    after k; reduce-scatter every micro-step, or set_requires_gradient_sync(False) until the last
    micro-step. With clip, clip_grad_norm_ on the accumulated .grad before each step."""
    model, k = setup.make(), setup.k
    opt = torch_cls(model.parameters(), **torch_kwargs)
    snapshots, norms = [], []
    for i in range(WINDOWS * k):
        last = (i + 1) % k == 0
        if no_sync:
            model.set_requires_gradient_sync(last)
        x, y = setup.batch(world_size, rank, i)
        (setup.loss(model, x, y) / k).backward()
        if last:
            if clip is not None:
                norms.append(full(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad()
            snapshots.append(full_params(model))
    return {"params": snapshots, "norms": norms}


def accum_micro_step(model, opt, rank, world_size, i, mode, grads_after_backward=None,
                     setup=DOUBLE):
    x, y = setup.batch(world_size, rank, i)
    loss = setup.loss(model, x, y)
    (loss / setup.k if mode == "window" else loss).backward()
    if grads_after_backward is not None:
        grads_after_backward.append([name for name, p in model.named_parameters()
                                     if p.grad is not None])
    if mode != "window" or (i + 1) % setup.k == 0:
        opt.step()
        opt.zero_grad()


def accum_loop(rank, world_size, cls, kwargs, mode, setup=DOUBLE, backend="torch",
               no_sync=False):
    """accumopt on the FSDP2 model in ``mode``. ``no_sync`` (the framework loop only):
    set_requires_gradient_sync(False) until the window's last backward, as Accelerate does for
    FSDP2 unless sync_each_batch=True."""
    model, k = setup.make(), setup.k
    opt = cls(model.parameters(), accum_steps=k, backend=backend, **MODES[mode], **kwargs)
    snapshots, norms, updated, grads_after_backward, triton_buckets = [], [], [], [], []
    try:
        for i in range(WINDOWS * k):
            if no_sync:
                model.set_requires_gradient_sync((i + 1) % k == 0)
            accum_micro_step(model, opt, rank, world_size, i, mode,
                             grads_after_backward if mode != "step" else None, setup)
            triton_buckets.append(len(opt._device_windows))
            if (i + 1) % k == 0:
                updated.append((opt.updated, opt.num_updates))
                snapshots.append(full_params(model))
                if kwargs.get("max_grad_norm") is not None:
                    norms.append(full(opt.grad_norm))
    finally:
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
    return {"params": snapshots, "norms": norms, "updated": updated,
            "grads_after_backward": grads_after_backward, "triton_buckets": triton_buckets}


# ----- checkpoints ------------------------------------------------------------------------------

def dcp_resume(rank, world_size, name, point, ckpt_dir):
    """Uninterrupted run of DCP_WINDOWS windows in step mode, saved (model and optimizer, the
    standard recipe) after SAVE_POINTS[point] micro-steps; then a fresh model (another init,
    loaded from the checkpoint) and a fresh optimizer resume from the checkpoint."""
    cls, kwargs = DCP_OPTS[name]
    save_at = SAVE_POINTS[point]
    model = DOUBLE.make()
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
    model = DOUBLE.make(seed=1)     # other values: the checkpoint must bring the parameters
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
    for name, (cls, kwargs, torch_cls, torch_kwargs) in EXACT.items():
        results[("torch-fp32", name)] = guarded(torch_loop, rank, world_size, torch_cls,
                                                torch_kwargs, False, None, FP32)
        for mode in MODES:
            results[("triton", name, mode)] = guarded(accum_loop, rank, world_size, cls, kwargs,
                                                      mode, FP32, "triton")
    cls, kwargs, torch_cls, torch_kwargs = CLIPPED
    results[("torch-fp32", "clipped")] = guarded(torch_loop, rank, world_size, torch_cls,
                                                 torch_kwargs, False, MAX_NORM, FP32)
    for mode in MODES:
        results[("triton", "clipped", mode)] = guarded(accum_loop, rank, world_size, cls, kwargs,
                                                       mode, FP32, "triton")
        for backend in ("torch", "triton"):
            results[(backend + "-fp32", "adamw-mean_of_squares", mode)] = guarded(
                accum_loop, rank, world_size, *MEAN_OF_SQUARES, mode, FP32, backend)
    for name, (cls, kwargs, _, _) in EXACT.items():
        results[("accum-no-sync", name)] = guarded(accum_loop, rank, world_size, cls, kwargs,
                                                   "window", DOUBLE, "torch", True)
    for name in TIED_MP_OPTS:
        cls, kwargs, torch_cls, torch_kwargs = EXACT[name]
        for no_sync in (False, True):
            results[("torch-tied-mp", name, no_sync)] = guarded(
                torch_loop, rank, world_size, torch_cls, torch_kwargs, no_sync, None, TIED_MP)
        for backend in ("torch", "triton"):
            for mode in MODES:
                results[("tied-mp", name, backend, mode)] = guarded(
                    accum_loop, rank, world_size, cls, kwargs, mode, TIED_MP, backend)
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
