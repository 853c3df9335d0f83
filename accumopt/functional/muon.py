"""Muon accumulated inside the optimizer, in plain PyTorch: after each window the parameters and
``momentum_buffer`` equal torch.optim.Muon stepped once with the window gradient Ḡ. It is the
CPU path, ``backend="torch"``, and the reference for the Triton kernels.

Notation: k = accum_steps, w·g_t a micro-batch's share of Ḡ (see
:mod:`accumopt.functional.micro_batch`; maximize and a GradScaler's scale live in w),
μ = momentum, λ = weight_decay, B the momentum buffer. ``first`` / ``update`` / a None gradient
mean what they mean in :mod:`accumopt.functional.sgd`. θ is fixed inside a window. 2-D
parameters only, as torch.optim.Muon.

torch.optim.Muon's step on a gradient G (torch/optim/_muon.py, ``_single_tensor_muon``):

    B ← lerp(B, G, 1-μ) = μ·B + (1-μ)·G        (B starts at zeros: no first-step rule)
    U = lerp(G, B, μ) = (1-μ)·G + μ·B  if nesterov, else U = B
    O = NS(U)                                   Newton–Schulz, in bfloat16 (below)
    θ ← θ·(1 - lr·λ)                            decoupled decay with the *unadjusted* lr
    θ ← θ - lr'·O                               lr' = adjust_lr(lr, shape)

    adjust_lr (A, B = θ.shape): None / "original": lr' = lr·√max(1, A/B);
                                "match_rms_adamw": lr' = 0.2·lr·√max(A, B)

NS(U) is torch's own ``_zeropower_via_newtonschulz``: X = bf16(U), transposed when A > B,
X ← X / max(‖X‖_F, eps), then ns_steps times S = X·Xᵀ, X ← a·X + (b·S + c·S·S)·X
(both as ``torch.addmm``), transposed back. It is imported from torch.optim._muon, so it is torch's
computation bit for bit (a float32 or reordered iteration differs by 5-20% of the update); a
copy of it, op for op, is used only where that private name is missing.

nesterov=False is bufferless: B is the accumulator. With the lerp written out,

    first fold:  B ← lerp(B, w·g, 1-μ) = μ·B + (1-μ)·w·g
    later folds: B ← B + (1-μ)·w·g
    update:      O = NS(B), then the two θ lines above

so after a window B = μ·B₀ + (1-μ)·Ḡ, torch's buffer after one step on Ḡ (with k = 1 it is
torch's lerp itself, bit for bit). nesterov=True needs Ḡ beside B (U mixes both), so it folds Ḡ
into one accumulator (:func:`~accumopt.functional.micro_batch.fold_into_accumulator`) and runs
torch's step on it at the update. Newton–Schulz runs once per window per matrix, on the update.
"""
import math

import torch

from .micro_batch import fold_into_accumulator, micro_batch_weights, scaled

try:
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
except ImportError:  # a torch without Muon, or one that renamed its private helpers
    def _zeropower_via_newtonschulz(grad, ns_coefficients, ns_steps, eps):
        """torch.optim.Muon's Newton–Schulz iteration (torch 2.9-2.13), op for op."""
        if ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational "
                             "efficiency")
        if len(grad.shape) != 2:
            raise ValueError("Input tensor gradient must be a 2D matrix")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        a, b, c = ns_coefficients
        ortho_grad = grad.bfloat16()
        if grad.size(0) > grad.size(1):
            ortho_grad = ortho_grad.T
        ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
        for _ in range(ns_steps):
            gram_matrix = ortho_grad @ ortho_grad.T
            gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
            ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
        if grad.size(0) > grad.size(1):
            ortho_grad = ortho_grad.T
        return ortho_grad

    def _adjust_lr(lr, adjust_lr_fn, param_shape):
        """torch.optim.Muon's learning-rate adjustment for the matrix shape."""
        rows, cols = param_shape[:2]
        if adjust_lr_fn is None or adjust_lr_fn == "original":
            ratio = math.sqrt(max(1, rows / cols))
        elif adjust_lr_fn == "match_rms_adamw":
            ratio = 0.2 * math.sqrt(max(rows, cols))
        else:
            ratio = 1.0
        return lr * ratio


def muon_micro_step(params, grads, grad_accums, momentum_buffers, first, update, *, lr,
                    weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
                    adjust_lr_fn, maximize, accum_steps, accum_reduction, grad_scale=None):
    """One micro-step of Muon (see the module docstring). ``grad_accums`` is only read with
    nesterov=True, where its entries may be None where the first fold is the update."""
    w, _ = micro_batch_weights(accum_steps, accum_reduction, maximize, grad_scale)
    for i, param in enumerate(params):
        if param.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter "
                             f"with size: {param.size()}")
        grad, buf = grads[i], momentum_buffers[i]
        if nesterov:
            mean = fold_into_accumulator(grad, grad_accums[i], first[i], update[i], w)
            if update[i]:
                buf.lerp_(mean, 1 - momentum)
                _muon_move(param, mean.lerp(buf, momentum), lr=lr, weight_decay=weight_decay,
                           ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                           adjust_lr_fn=adjust_lr_fn)
            continue
        if grad is not None:
            if first[i]:
                buf.lerp_(scaled(grad, w), 1 - momentum)
            else:
                buf.add_(grad, alpha=(1 - momentum) * w)
        if update[i]:
            _muon_move(param, buf, lr=lr, weight_decay=weight_decay,
                       ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                       adjust_lr_fn=adjust_lr_fn)


def _muon_move(param, direction, *, lr, weight_decay, ns_coefficients, eps, ns_steps,
               adjust_lr_fn):
    """The parameter move of torch.optim.Muon's step, op for op: orthogonalise, decay with the
    unadjusted lr, move with the shape-adjusted one."""
    ortho = _zeropower_via_newtonschulz(direction, ns_coefficients, ns_steps, eps)
    adjusted_lr = _adjust_lr(lr, adjust_lr_fn, param.shape)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(ortho, alpha=-adjusted_lr)


def muon_nesterov_micro_step(params, grads, grad_accums, momentum_buffers, first, update, *,
                             nesterov=True, **hyper):
    """:func:`muon_micro_step` with nesterov=True: Ḡ folded into ``grad_accums``."""
    assert nesterov, "the accumulator form is nesterov's"
    muon_micro_step(params, grads, grad_accums, momentum_buffers, first, update, nesterov=True,
                    **hyper)


def muon_momentum_micro_step(params, grads, momentum_buffers, first, update, *, nesterov=False,
                             **hyper):
    """:func:`muon_micro_step` with nesterov=False: bufferless, the momentum buffer is the
    accumulator."""
    assert not nesterov, "the bufferless form is nesterov=False's"
    muon_micro_step(params, grads, [None] * len(params), momentum_buffers, first, update,
                    nesterov=False, **hyper)
