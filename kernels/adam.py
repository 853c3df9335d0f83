"""Triton launchers for the Adam variants, beside accumopt.functional.adam and taking its
arguments, except that the per-tensor ``first`` / ``update`` lists and the update counts are the
device counters of ``window`` (a DeviceWindow over params and the state in SLOTS order)."""
from .micro_step import ADAM_MEAN_OF_SQUARES, ADAM_SQUARE_OF_MEAN

MEAN_OF_SQUARES_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SQUARE_OF_MEAN_SLOTS = ("grad_accum", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _launch(variant, window, grads, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
            amsgrad, maximize, accum_steps, accum_reduction, grad_scale, found_inf):
    window.set_grads(grads)
    window.launch(variant, accum_steps=accum_steps, lr=lr, weight_decay=weight_decay,
                  maximize=maximize, accum_reduction=accum_reduction, beta1=beta1, beta2=beta2,
                  eps=eps, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                  grad_scale=grad_scale, found_inf=found_inf)


def adam_mean_of_squares_micro_step(window, grads, *, lr, beta1, beta2, eps, weight_decay,
                                    decoupled_weight_decay, amsgrad, maximize, accum_steps,
                                    accum_reduction, grad_scale=None, found_inf=None):
    _launch(ADAM_MEAN_OF_SQUARES, window, grads, lr, beta1, beta2, eps, weight_decay,
            decoupled_weight_decay, amsgrad, maximize, accum_steps, accum_reduction, grad_scale,
            found_inf)


def adam_square_of_mean_micro_step(window, grads, *, lr, beta1, beta2, eps, weight_decay,
                                   decoupled_weight_decay, amsgrad, maximize, accum_steps,
                                   accum_reduction, grad_scale=None, found_inf=None):
    _launch(ADAM_SQUARE_OF_MEAN, window, grads, lr, beta1, beta2, eps, weight_decay,
            decoupled_weight_decay, amsgrad, maximize, accum_steps, accum_reduction, grad_scale,
            found_inf)
