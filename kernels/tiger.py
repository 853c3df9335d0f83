"""Triton launcher for Tiger, beside accumopt.functional.tiger and taking its arguments. The
kernel folds: m ← β·m + (1-β)·w·g on a window's first fold, m ← m + (1-β)·w·g on the later ones
(SGD momentum's bufferless fold with μ = τ = β and no decay). It never moves: the window's last
micro-step, whose move needs sign(m) and the RMS of the whole tensor, runs the functional form
(the optimizer's ``move_in_torch``)."""
from .micro_step import SGDM

TIGER_SLOTS = ("exp_avg",)


def tiger_micro_step(window, grads, *, lr, beta, weight_decay, lr_scale, maximize, accum_steps,
                     accum_reduction, grad_scale=None, found_inf=None, **launch):
    window.launch(SGDM, grads, accum_steps=accum_steps, lr=0.0, weight_decay=0.0,
                  maximize=maximize, accum_reduction=accum_reduction, momentum=beta,
                  dampening=beta, grad_scale=grad_scale, found_inf=found_inf,
                  **dict(launch, fold_only=True))
