"""Triton launchers for the Adam variants, beside accumopt.functional.adam and taking its
arguments, except that the per-tensor ``first`` / ``update`` lists and the update counts are the
device counters of ``window`` (a DeviceWindow over params and the state in the ``*_SLOTS``
order). ``launch`` is DeviceWindow.launch's options
(``hook_tensor``, ``flush``, ``fold_only``, ``addresses``)."""
from .micro_step import ADAM_MEAN_OF_SQUARES, ADAM_SQUARE_OF_MEAN

MEAN_OF_SQUARES_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SQUARE_OF_MEAN_SLOTS = ("grad_accum", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def adam_mean_of_squares_micro_step(window, grads, *, lr, beta1, beta2, eps, weight_decay,
                                    decoupled_weight_decay, amsgrad, maximize, accum_steps,
                                    accum_reduction, grad_scale=None, found_inf=None,
                                    **launch):
    window.launch(ADAM_MEAN_OF_SQUARES, grads, accum_steps=accum_steps, lr=lr,
                  weight_decay=weight_decay, maximize=maximize, accum_reduction=accum_reduction,
                  beta1=beta1, beta2=beta2, eps=eps,
                  decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                  grad_scale=grad_scale, found_inf=found_inf, **launch)


def adam_square_of_mean_micro_step(window, grads, *, lr, beta1, beta2, eps, weight_decay,
                                   decoupled_weight_decay, amsgrad, maximize, accum_steps,
                                   accum_reduction, grad_scale=None, found_inf=None,
                                   **launch):
    window.launch(ADAM_SQUARE_OF_MEAN, grads, accum_steps=accum_steps, lr=lr,
                  weight_decay=weight_decay, maximize=maximize, accum_reduction=accum_reduction,
                  beta1=beta1, beta2=beta2, eps=eps,
                  decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                  grad_scale=grad_scale, found_inf=found_inf, **launch)
