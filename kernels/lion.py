"""Triton launcher for Lion, beside accumopt.functional.lion and taking its arguments. The
kernel folds w·g into the accumulator of Ḡ (the exact variants' fold: acc ← w·g on a window's
first fold, acc ← acc + w·g after). It never moves: the window's last micro-step, whose move
needs sign(β1·m + (1-β1)·Ḡ), runs the functional form (the optimizer's ``move_in_torch``)."""
from .micro_step import SGD_EXACT

LION_SLOTS = ("grad_accum", "exp_avg")


def lion_micro_step(window, grads, *, lr, beta1, beta2, weight_decay, maximize, accum_steps,
                    accum_reduction, grad_scale=None, found_inf=None, **launch):
    window.launch(SGD_EXACT, grads, accum_steps=accum_steps, lr=0.0, weight_decay=0.0,
                  maximize=maximize, accum_reduction=accum_reduction, momentum=0.0,
                  momentum_buffer=False, grad_scale=grad_scale, found_inf=found_inf,
                  **dict(launch, fold_only=True))
