"""How one micro-batch gradient enters its window, shared by every variant.

A window has k = ``accum_steps`` micro-batches. Its gradient is

    Ḡ = Σ_t w·g_t        w = 1/k for accum_reduction="mean", 1 for "sum"

and each micro-batch's own estimate of that window gradient is ĝ_t = k·w·g_t (the
micro-batch mean gradient for "mean"; k times the window-normalised gradient for "sum"),
so that ĝ_t = Ḡ when every micro-batch agrees. ``maximize`` flips the sign of both, and a
GradScaler's scale divides both, so the weights below are the only place those three enter.
"""
import torch
from torch import Tensor

ACCUM_REDUCTIONS = ("mean", "sum")


def micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale=None):
    """Return (window_weight, estimate_weight): the factors taking a raw gradient g_t to its
    share w·g_t of the window gradient and to its estimate ĝ_t of the window gradient."""
    sign = -1.0 if maximize else 1.0
    # Dividing by the scale here folds GradScaler's unscale into the fold: no pass of its own.
    unscale = 1.0 if grad_scale is None else 1.0 / grad_scale
    if accum_reduction == "mean":
        return sign * unscale / accum_steps, sign * unscale
    return sign * unscale, sign * unscale * accum_steps


def scaled(grad: Tensor, weight: float) -> Tensor:
    """weight·grad, returning ``grad`` itself when weight is 1 (callers never write to it).

    Multiplying by exactly 1 or -1 would give the same bits; skipping it saves a pass and keeps
    accum_steps=1 bitwise equal to torch.optim, which uses ``-grad`` for maximize."""
    if weight == 1.0:
        return grad
    if weight == -1.0:
        return grad.neg()
    return grad.mul(weight)


def scaled_list(grads: list[Tensor], weight: float) -> list[Tensor]:
    """The multi-tensor form of :func:`scaled`."""
    if weight == 1.0 or not grads:
        return grads
    if weight == -1.0:
        return torch._foreach_neg(grads)
    return torch._foreach_mul(grads, weight)


def copy_all(targets, sources):
    """``torch._foreach_copy_``, except for DTensors (FSDP2 shards), which it has no sharding
    rule for: those are copied one by one."""
    if any(type(t).__name__ == "DTensor" for t in targets):
        for target, source in zip(targets, sources):
            target.copy_(source)
    else:
        torch._foreach_copy_(targets, sources)


def fold_into_accumulator(grad, accum, first, update, window_weight):
    """The exact variants' fold: accum ← w·g on a parameter's first fold of a window, else
    accum ← accum + w·g. Returns the window gradient so far (Ḡ on the update step).

    ``grad`` None means no gradient this micro-step (an update-only step). When the first fold
    is also the update (k = 1, or the parameter's only gradient came on the last micro-step)
    nothing is stored: Ḡ = w·g is returned directly and ``accum`` may be None."""
    if grad is None:
        return accum
    if first:
        if update:
            return scaled(grad, window_weight)
        return accum.copy_(scaled(grad, window_weight))
    return accum.add_(grad, alpha=window_weight)


def fold_into_accumulators(grads, accums, first, update, window_weight):
    """The multi-tensor form of :func:`fold_into_accumulator` (one device and dtype)."""
    out = list(accums)
    direct = [j for j, g in enumerate(grads) if g is not None and first[j] and update[j]]
    stored = [j for j, g in enumerate(grads) if g is not None and first[j] and not update[j]]
    added = [j for j, g in enumerate(grads) if g is not None and not first[j]]
    for j, x in zip(direct, scaled_list([grads[j] for j in direct], window_weight)):
        out[j] = x
    if stored:
        copy_all([accums[j] for j in stored],
                 scaled_list([grads[j] for j in stored], window_weight))
    if added:
        torch._foreach_add_([accums[j] for j in added], [grads[j] for j in added],
                            alpha=window_weight)
    return out
