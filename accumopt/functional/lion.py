"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675; the
update of lucidrains/lion-pytorch) accumulated inside the optimizer, in plain PyTorch. It is
the CPU path, ``backend="torch"``, and the reference for the Triton kernels.

Notation: k = accum_steps, w·g_t a micro-batch's share of the window gradient Ḡ (see
:mod:`accumopt.functional.micro_batch`; maximize and a GradScaler's scale live in w),
λ = weight_decay. ``first`` / ``update`` / a None gradient mean what they mean in
:mod:`accumopt.functional.sgd`. θ is fixed inside a window.

Lion's update reads Ḡ twice with different weights (β1 for the direction, β2 for the
momentum), so the momentum cannot be the accumulator: one accumulator of Ḡ is held, folded as
the exact variants' (:func:`~accumopt.functional.micro_batch.fold_into_accumulator`):

    first fold:  acc ← w·g              (not stored when the first fold is also the update)
    later folds: acc ← acc + w·g        (acc = Ḡ on the update step)

and on the update, with θ and m before it, lion-pytorch's step on Ḡ, op for op:

    θ ← θ·(1 - lr·λ)
    θ ← θ - lr·sign(β1·m + (1-β1)·Ḡ)
    m ← β2·m + (1-β2)·Ḡ

sign(0) = 0, as torch.sign.
"""
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .micro_batch import fold_into_accumulator, fold_into_accumulators, micro_batch_weights


def lion_micro_step(params, grads, grad_accums, exp_avgs, first, update, *, lr, beta1, beta2,
                    weight_decay, maximize, accum_steps, accum_reduction, grad_scale=None,
                    foreach=False):
    """One micro-step of Lion with an accumulator: fold w·g into it, and on the update step run
    Lion's step with Ḡ. ``grad_accums`` entries may be None where the first fold is the
    update."""
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    if foreach:
        grouped = _group_tensors_by_device_and_dtype([params, grads, grad_accums, exp_avgs],
                                                     with_indices=True)
        for (dp, dg, dacc, dm), indices in grouped.values():
            means = fold_into_accumulators(dg, dacc, [first[i] for i in indices],
                                           [update[i] for i in indices], w)
            moved = [j for j, i in enumerate(indices) if update[i]]
            if moved:
                _multi_tensor_lion_update(*([lst[j] for j in moved] for lst in (dp, means, dm)),
                                          **hyper)
        return
    for i, param in enumerate(params):
        mean = fold_into_accumulator(grads[i], grad_accums[i], first[i], update[i], w)
        if update[i]:
            _lion_update(param, mean, exp_avgs[i], **hyper)


def _lion_update(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay):
    """lion-pytorch's update_fn for one parameter, op for op (``grad`` is never written)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    param.add_(direction, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def _multi_tensor_lion_update(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay):
    """The multi-tensor form of :func:`_lion_update` (one device and dtype)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    direction = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(direction, grads, alpha=1 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
