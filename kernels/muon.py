"""Triton launcher for Muon, beside accumopt.functional.muon and taking its arguments. The
kernel folds: with nesterov=False into the momentum buffer (B ← μ·B + (1-μ)·w·g on a window's
first fold, B ← B + (1-μ)·w·g after: SGD momentum's bufferless fold with μ = τ = momentum),
with nesterov=True into the accumulator of Ḡ. It never moves: the window's last micro-step,
whose move runs Newton–Schulz, runs the functional form (the optimizer's ``move_in_torch``)."""
from .micro_step import SGD_EXACT, SGDM

MUON_SLOTS = ("momentum_buffer",)
MUON_NESTEROV_SLOTS = ("grad_accum", "momentum_buffer")


def muon_micro_step(window, grads, *, lr, weight_decay, momentum, nesterov, ns_coefficients,
                    eps, ns_steps, adjust_lr_fn, maximize, accum_steps, accum_reduction,
                    grad_scale=None, found_inf=None, **launch):
    fold = dict(momentum=0.0, momentum_buffer=False) if nesterov else \
        dict(momentum=momentum, dampening=momentum)
    window.launch(SGD_EXACT if nesterov else SGDM, grads, accum_steps=accum_steps, lr=0.0,
                  weight_decay=0.0, maximize=maximize, accum_reduction=accum_reduction,
                  grad_scale=grad_scale, found_inf=found_inf, **fold,
                  **dict(launch, fold_only=True))
