"""Tiger (bojone/tiger, kexue.fm/archives/9512) accumulated inside the optimizer, in plain
PyTorch. It is the CPU path, ``backend="torch"``, and the reference for the Triton kernels.

Notation: k = accum_steps, w·g_t a micro-batch's share of the window gradient Ḡ (see
:mod:`accumopt.functional.micro_batch`; maximize and a GradScaler's scale live in w),
β = beta, λ = weight_decay. ``first`` / ``update`` / a None gradient mean what they mean in
:mod:`accumopt.functional.sgd`. θ is fixed inside a window.

Tiger is Lion with β1 = β2: the update reads only the momentum, so the momentum can be the
accumulator (Su's χ-indicator rule) and no gradient buffer is held. Per window

    m ← β·m + (1-β)·Ḡ
    θ ← θ - η·(sign(m) + λ·θ)          m after the fold, θ before the update

folded micro-batch by micro-batch:

    first fold:  m ← β·m + (1-β)·w·g
    later folds: m ← m + (1-β)·w·g
    update:      η = lr·s, then θ ← θ - η·(sign(m) + λ·θ)

with the step-size scale s chosen by ``lr_scale`` (a param-group option):

    "rms"      s = RMS(θ) = √mean(θ²) over the whole tensor (matrices)
    "row_rms"  s = √mean(θ²) over the last dimension, one s per row (embeddings)
    "half"     s = 0.5, and λ = 0 whatever weight_decay (biases and norm gains)
    None       s = 1

s is taken from θ before the update, in float32 for low-precision θ, and kept on the device
(no host sync). sign(0) = 0, as torch.sign. bojone's code applies the same rule: b1 = β on
the window's first micro-step and 1 after, b2 = (1-β)/k, lr = 0 except on the window's last.

Not carried over from bojone/tiger (the contract decides these):
- Its NaN guard — a tensor whose gradient holds a NaN is not folded (b1 = 1, g = 0) and θ is
  shrunk, θ ← (θ - c)·0.99 + c (c = 1 for norm gains, else 0), on that micro-step. It needs
  any(isnan(g)) over the whole tensor before m may be written, i.e. a second read of g on every
  micro-step, and it moves θ inside a window. accumopt drops a micro-batch with inf/NaN
  gradients as a whole (the GradScaler rule, in the window bookkeeping) instead.
- Its piecewise-linear lr schedule (use a torch scheduler through accumopt.per_update) and its
  name-based choice of s (accumopt.tiger_param_groups does that per param group).
"""
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .micro_batch import micro_batch_weights

LR_SCALES = ("rms", "row_rms", "half", None)


def tiger_micro_step(params, grads, exp_avgs, first, update, *, lr, beta, weight_decay,
                     lr_scale, maximize, accum_steps, accum_reduction, grad_scale=None,
                     foreach=False):
    """One micro-step of bufferless Tiger (see the module docstring)."""
    if lr_scale not in LR_SCALES:
        raise ValueError(f"Invalid lr_scale: {lr_scale!r} (must be one of {LR_SCALES})")
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    alpha = (1 - beta) * w
    decay = 0.0 if lr_scale == "half" else weight_decay
    if foreach:
        return _multi_tensor_tiger(params, grads, exp_avgs, first, update, lr=lr, beta=beta,
                                   alpha=alpha, weight_decay=decay, lr_scale=lr_scale)
    for i, param in enumerate(params):
        grad, exp_avg = grads[i], exp_avgs[i]
        if grad is not None:
            if first[i]:
                exp_avg.mul_(beta)
            exp_avg.add_(grad, alpha=alpha)
        if update[i]:
            u = torch.sign(exp_avg)
            if decay != 0:
                u.add_(param, alpha=decay)
            eta = step_size(param, lr, lr_scale)
            if isinstance(eta, float):
                param.add_(u, alpha=-eta)
            else:
                param.sub_(u.mul_(eta))


def step_size(param, lr, lr_scale):
    """η = lr·s for one parameter: a float for "half" / None, else a float32 tensor on the
    parameter's device (0-d for "rms", one entry per row, shape (..., 1), for "row_rms")."""
    if lr_scale is None:
        return float(lr)
    if lr_scale == "half":
        return 0.5 * lr
    x = param if param.dtype in (torch.float32, torch.float64) else param.float()
    if lr_scale == "row_rms" and x.ndim > 0:
        return x.square().mean(dim=-1, keepdim=True).sqrt_().mul_(lr)
    return x.square().mean().sqrt_().mul_(lr)


def _multi_tensor_tiger(params, grads, exp_avgs, first, update, *, lr, beta, alpha,
                        weight_decay, lr_scale):
    grouped = _group_tensors_by_device_and_dtype([params, grads, exp_avgs], with_indices=True)
    for (dp, dg, dm), indices in grouped.values():
        folded = [j for j, g in enumerate(dg) if g is not None]
        firsts = [dm[j] for j in folded if first[indices[j]]]
        if firsts:
            torch._foreach_mul_(firsts, beta)
        if folded:
            torch._foreach_add_([dm[j] for j in folded], [dg[j] for j in folded], alpha=alpha)
        moved = [j for j, i in enumerate(indices) if update[i]]
        if not moved:
            continue
        p = [dp[j] for j in moved]
        u = torch._foreach_sign([dm[j] for j in moved])
        if weight_decay != 0:
            torch._foreach_add_(u, p, alpha=weight_decay)
        if lr_scale in ("half", None):
            torch._foreach_add_(p, u, alpha=-step_size(p[0], lr, lr_scale))
        else:
            torch._foreach_mul_(u, [step_size(x, lr, lr_scale) for x in p])
            torch._foreach_sub_(p, u)


__all__ = ["tiger_micro_step", "step_size", "LR_SCALES"]
