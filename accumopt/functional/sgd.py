"""SGD with momentum accumulated inside the optimizer: the math of both SGD variants in plain
PyTorch. It is the CPU path, ``backend="torch"``, and the reference for the Triton kernels.

Notation: k = accum_steps, w·g_t a micro-batch's share of the window gradient Ḡ (see
:mod:`accumopt.functional.micro_batch`), μ = momentum, τ = dampening, λ = weight_decay.
Each call is one micro-step for a list of parameters. Per parameter, ``first`` says this is its
first fold of the window (decay the moment now), ``update`` says the window ends here (move θ),
and a ``None`` gradient means an update-only step: the parameter had gradients earlier in the
window but none on its last micro-step. ``fresh`` says the momentum buffer holds no update yet,
for torch's rule that the first step copies the gradient into the buffer without dampening.

``sgdm_micro_step`` (momentum > 0, nesterov=False) is bufferless, Su's χ-indicator rule with
the buffer as the accumulator:

    first fold:  buf ← μ·buf + (1-τ)·(w·g + λθ)        (fresh: buf ← w·g + λθ)
    later folds: buf ← buf + (1-τ)·w·g                  (fresh: buf ← buf + w·g)
    update:      θ ← θ - lr·buf

After a window buf = μ·buf₀ + (1-τ)·(Ḡ + λθ): torch.optim.SGD stepped once with Ḡ. θ is fixed
inside the window, so λθ enters once.

``sgd_exact_micro_step`` (nesterov, or momentum = 0) needs Ḡ itself, so it keeps an accumulator
and runs torch.optim.SGD's step on Ḡ at the update.
"""
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .micro_batch import (copy_all, fold_into_accumulator, fold_into_accumulators,
                          micro_batch_weights, scaled, scaled_list)


def sgdm_micro_step(params, grads, momentum_buffers, fresh, first, update, *, lr, momentum,
                    dampening, weight_decay, maximize, accum_steps, accum_reduction,
                    grad_scale=None, foreach=False):
    """One micro-step of bufferless SGD-momentum (see the module docstring)."""
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    if foreach:
        return _multi_tensor_sgdm(params, grads, momentum_buffers, fresh, first, update, lr=lr,
                                  momentum=momentum, dampening=dampening,
                                  weight_decay=weight_decay, window_weight=w)
    for i, param in enumerate(params):
        grad, buf = grads[i], momentum_buffers[i]
        if grad is not None:
            if first[i]:
                x = scaled(grad, w)
                if weight_decay != 0:
                    x = x.add(param, alpha=weight_decay)
                if fresh[i]:
                    buf.copy_(x)
                else:
                    buf.mul_(momentum).add_(x, alpha=1 - dampening)
            else:
                buf.add_(grad, alpha=w * (1.0 if fresh[i] else 1 - dampening))
        if update[i]:
            param.add_(buf, alpha=-lr)


def _multi_tensor_sgdm(params, grads, momentum_buffers, fresh, first, update, *, lr, momentum,
                       dampening, weight_decay, window_weight):
    grouped = _group_tensors_by_device_and_dtype([params, grads, momentum_buffers],
                                                 with_indices=True)
    for (dev_params, dev_grads, dev_bufs), indices in grouped.values():
        is_fresh = [fresh[i] for i in indices]
        is_first = [first[i] for i in indices]
        folded = [j for j, g in enumerate(dev_grads) if g is not None]
        first_folds = [j for j in folded if is_first[j]]
        if first_folds:
            xs = scaled_list([dev_grads[j] for j in first_folds], window_weight)
            if weight_decay != 0:
                xs = torch._foreach_add(xs, [dev_params[j] for j in first_folds],
                                        alpha=weight_decay)
            new = [(dev_bufs[j], x) for j, x in zip(first_folds, xs) if is_fresh[j]]
            old = [(dev_bufs[j], x) for j, x in zip(first_folds, xs) if not is_fresh[j]]
            if new:
                copy_all(*map(list, zip(*new)))
            if old:
                bufs, old_xs = map(list, zip(*old))
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, old_xs, alpha=1 - dampening)
        for fresh_flag, coefficient in ((True, 1.0), (False, 1 - dampening)):
            later = [j for j in folded if not is_first[j] and is_fresh[j] == fresh_flag]
            if later:
                torch._foreach_add_([dev_bufs[j] for j in later], [dev_grads[j] for j in later],
                                    alpha=window_weight * coefficient)
        moved = [j for j, i in enumerate(indices) if update[i]]
        if moved:
            torch._foreach_add_([dev_params[j] for j in moved], [dev_bufs[j] for j in moved],
                                alpha=-lr)


def sgd_exact_micro_step(params, grads, grad_accums, momentum_buffers, fresh, first, update, *,
                         lr, momentum, dampening, weight_decay, nesterov, maximize, accum_steps,
                         accum_reduction, grad_scale=None, foreach=False):
    """One micro-step of SGD with an accumulator: fold w·g into it, and on the update step run
    torch.optim.SGD's step with Ḡ. ``momentum_buffers`` entries are None when momentum is 0;
    ``grad_accums`` entries may be None where the first fold is the update."""
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov)
    if foreach:
        grouped = _group_tensors_by_device_and_dtype(
            [params, grads, grad_accums, momentum_buffers], with_indices=True)
        for (dev_params, dev_grads, dev_accums, dev_bufs), indices in grouped.values():
            means = fold_into_accumulators(dev_grads, dev_accums, [first[i] for i in indices],
                                           [update[i] for i in indices], w)
            moved = [j for j, i in enumerate(indices) if update[i]]
            if moved:
                _multi_tensor_sgd_update([dev_params[j] for j in moved], [means[j] for j in moved],
                                         [dev_bufs[j] for j in moved],
                                         [fresh[indices[j]] for j in moved], **hyper)
        return
    for i, param in enumerate(params):
        mean = fold_into_accumulator(grads[i], grad_accums[i], first[i], update[i], w)
        if update[i]:
            _sgd_update(param, mean, momentum_buffers[i], fresh[i], **hyper)


def _sgd_update(param, grad, buf, fresh, *, lr, momentum, dampening, weight_decay, nesterov):
    """torch.optim.SGD's step for one parameter, op for op."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        if fresh:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    param.add_(grad, alpha=-lr)


def _multi_tensor_sgd_update(params, grads, bufs, fresh, *, lr, momentum, dampening,
                             weight_decay, nesterov):
    """The multi-tensor form of :func:`_sgd_update` (one device and dtype)."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        new = [j for j, f in enumerate(fresh) if f]
        old = [j for j, f in enumerate(fresh) if not f]
        if new:
            copy_all([bufs[j] for j in new], [grads[j] for j in new])
        if old:
            torch._foreach_mul_([bufs[j] for j in old], momentum)
            torch._foreach_add_([bufs[j] for j in old], [grads[j] for j in old],
                                alpha=1 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)
