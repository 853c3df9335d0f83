"""Adam(W) accumulated inside the optimizer: the math of both second moments in plain PyTorch.
It is the CPU path, ``backend="torch"``, and the reference for the Triton kernels.

Notation: k = accum_steps, w·g_t a micro-batch's share of the window gradient Ḡ and ĝ_t its
own estimate of Ḡ (see :mod:`accumopt.functional.micro_batch`), λ = weight_decay, c = the
parameter's update count. ``first`` / ``update`` / a None gradient mean what they mean in
:mod:`accumopt.functional.sgd`. θ is fixed inside a window.

``adam_mean_of_squares_micro_step`` (the default, bufferless, Su's rule): per window

    m ← β1·m + (1-β1)·mean_t(ĝ_t + λθ)        = β1·m + (1-β1)·(Ḡ + λθ)
    v ← β2·v + (1-β2)·mean_t((ĝ_t + λθ)²)

with coupled weight decay λ (zero for decoupled), folded micro-batch by micro-batch:

    first fold:  m ← β1·m + (1-β1)·(w·g + λθ)
                 v ← β2·v + (1-β2)/k·(ĝ + λθ)² + (1-β2)(k-1)/k·(λθ)²
    later folds: m ← m + (1-β1)·w·g
                 v ← v + (1-β2)/k·ĝ·(ĝ + 2λθ)

The first fold counts every micro-batch as gradient-free ((ĝ+λθ)² = (λθ)²) and later folds add
the difference, so a micro-batch without a gradient contributes exactly ĝ = 0 with no count
of folds kept. With k = 1 every term above is torch.optim.Adam's, op for op.

``adam_square_of_mean_micro_step`` keeps an accumulator of Ḡ and runs torch.optim.Adam's step
on it at the update, so v uses (Ḡ + λθ)².

The update (both): c ← c + 1; decoupled: θ ← θ·(1 - lr·λ); then
θ ← θ - lr/(1-β1^c) · m / (√(v or max v) / √(1-β2^c) + eps), torch's eps placement.
"""
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .micro_batch import (fold_into_accumulator, fold_into_accumulators, micro_batch_weights,
                          scaled, scaled_list)


def adam_mean_of_squares_micro_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                    state_steps, first, update, *, lr, beta1, beta2, eps,
                                    weight_decay, decoupled_weight_decay, amsgrad, maximize,
                                    accum_steps, accum_reduction, grad_scale=None,
                                    foreach=False):
    """One micro-step of bufferless Adam with Su's mean-of-squares second moment."""
    k = accum_steps
    w, w_est = micro_batch_weights(k, accum_reduction, maximize, grad_scale)
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    move = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad)
    if foreach:
        grouped = _group_tensors_by_device_and_dtype(
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],
            with_indices=True)
        for (dp, dg, dm, dv, dmax, dsteps), indices in grouped.values():
            folded = [j for j, g in enumerate(dg) if g is not None]
            firsts = [j for j in folded if first[indices[j]]]
            laters = [j for j in folded if not first[indices[j]]]
            if firsts:
                p, g, m, v = ([lst[j] for j in firsts] for lst in (dp, dg, dm, dv))
                d = scaled_list(g, w_est)
                if coupled != 0:
                    d = torch._foreach_add(d, p, alpha=coupled)
                x = d if k == 1 else scaled_list(g, w)
                if k != 1 and coupled != 0:
                    x = torch._foreach_add(x, p, alpha=coupled)
                torch._foreach_lerp_(m, x, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, d, d, value=(1 - beta2) / k)
                if coupled != 0 and k > 1:
                    torch._foreach_addcmul_(v, p, p,
                                            value=(1 - beta2) * (k - 1) / k * coupled ** 2)
            if laters:
                p, g, m, v = ([lst[j] for j in laters] for lst in (dp, dg, dm, dv))
                torch._foreach_add_(m, g, alpha=(1 - beta1) * w)
                if coupled != 0:
                    e = scaled_list(g, w_est)
                    torch._foreach_addcmul_(v, e, torch._foreach_add(e, p, alpha=2 * coupled),
                                            value=(1 - beta2) / k)
                else:
                    torch._foreach_addcmul_(v, g, g, value=(1 - beta2) / k * w_est ** 2)
            moved = [j for j, i in enumerate(indices) if update[i]]
            if moved:
                _multi_tensor_adam_move(*([lst[j] for j in moved]
                                          for lst in (dp, dm, dv, dmax, dsteps)), **move)
        return
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq = grads[i], exp_avgs[i], exp_avg_sqs[i]
        if grad is not None:
            if first[i]:
                d = scaled(grad, w_est)
                if coupled != 0:
                    d = d.add(param, alpha=coupled)
                x = d if k == 1 else scaled(grad, w)
                if k != 1 and coupled != 0:
                    x = x.add(param, alpha=coupled)
                exp_avg.lerp_(x, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(d, d, value=(1 - beta2) / k)
                if coupled != 0 and k > 1:
                    exp_avg_sq.addcmul_(param, param,
                                        value=(1 - beta2) * (k - 1) / k * coupled ** 2)
            else:
                exp_avg.add_(grad, alpha=(1 - beta1) * w)
                if coupled != 0:
                    e = scaled(grad, w_est)
                    exp_avg_sq.addcmul_(e, e.add(param, alpha=2 * coupled), value=(1 - beta2) / k)
                else:
                    exp_avg_sq.addcmul_(grad, grad, value=(1 - beta2) / k * w_est ** 2)
        if update[i]:
            _adam_move(param, exp_avg, exp_avg_sq, max_exp_avg_sqs[i], state_steps[i], **move)


def adam_square_of_mean_micro_step(params, grads, grad_accums, exp_avgs, exp_avg_sqs,
                                   max_exp_avg_sqs, state_steps, first, update, *, lr, beta1,
                                   beta2, eps, weight_decay, decoupled_weight_decay, amsgrad,
                                   maximize, accum_steps, accum_reduction, grad_scale=None,
                                   foreach=False):
    """One micro-step of exact Adam: fold w·g into the accumulator, and on the update step run
    torch.optim.Adam's step with Ḡ. ``grad_accums`` entries may be None where the first fold is
    the update."""
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    move = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad)
    if foreach:
        grouped = _group_tensors_by_device_and_dtype(
            [params, grads, grad_accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],
            with_indices=True)
        for (dp, dg, dacc, dm, dv, dmax, dsteps), indices in grouped.values():
            means = fold_into_accumulators(dg, dacc, [first[i] for i in indices],
                                           [update[i] for i in indices], w)
            moved = [j for j, i in enumerate(indices) if update[i]]
            if moved:
                p, mean, m, v, vmax, steps = ([lst[j] for j in moved]
                                              for lst in (dp, means, dm, dv, dmax, dsteps))
                if coupled != 0:
                    mean = torch._foreach_add(mean, p, alpha=coupled)
                torch._foreach_lerp_(m, mean, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, mean, mean, value=1 - beta2)
                _multi_tensor_adam_move(p, m, v, vmax, steps, **move)
        return
    for i, param in enumerate(params):
        mean = fold_into_accumulator(grads[i], grad_accums[i], first[i], update[i], w)
        if update[i]:
            if coupled != 0:
                mean = mean.add(param, alpha=coupled)
            exp_avgs[i].lerp_(mean, 1 - beta1)
            exp_avg_sqs[i].mul_(beta2).addcmul_(mean, mean, value=1 - beta2)
            _adam_move(param, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i], state_steps[i],
                       **move)


def _adam_move(param, exp_avg, exp_avg_sq, max_exp_avg_sq, step_t, *, lr, beta1, beta2, eps,
               weight_decay, decoupled_weight_decay, amsgrad):
    """The parameter move of torch.optim.Adam's step, op for op, with the moments already
    folded: count the update, decay θ if decoupled, bias-correct and move."""
    step_t += 1
    if weight_decay != 0 and decoupled_weight_decay:
        param.mul_(1 - lr * weight_decay)
    step = step_t.item()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        exp_avg_sq = max_exp_avg_sq
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def _multi_tensor_adam_move(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
                            beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad):
    """The multi-tensor form of :func:`_adam_move` (one device and dtype)."""
    torch._foreach_add_(state_steps, 1)
    if weight_decay != 0 and decoupled_weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    steps = [s.item() for s in state_steps]
    step_sizes = [-(lr / (1 - beta1 ** s)) for s in steps]
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        exp_avg_sqs = max_exp_avg_sqs
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
