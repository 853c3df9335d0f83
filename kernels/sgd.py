"""Triton launchers for the SGD variants, beside accumopt.functional.sgd and taking its
arguments, except that the per-tensor ``fresh`` / ``first`` / ``update`` lists are the device
counters of ``window`` (a DeviceWindow over params and the state in the ``*_SLOTS`` order), so a
GradScaler ``found_inf`` can drop a micro-batch on the device. ``launch`` is DeviceWindow.launch's
options (``hook_tensor``, ``flush``, ``fold_only``, ``addresses``)."""
from .micro_step import SGD_EXACT, SGDM

SGDM_SLOTS = ("momentum_buffer",)
SGD_EXACT_SLOTS = ("grad_accum", "momentum_buffer")


def sgdm_micro_step(window, grads, *, lr, momentum, dampening, weight_decay, maximize,
                    accum_steps, accum_reduction, grad_scale=None, found_inf=None, **launch):
    window.launch(SGDM, grads, accum_steps=accum_steps, lr=lr, weight_decay=weight_decay,
                  maximize=maximize, accum_reduction=accum_reduction, momentum=momentum,
                  dampening=dampening, grad_scale=grad_scale, found_inf=found_inf,
                  **launch)


def sgd_exact_micro_step(window, grads, *, lr, momentum, dampening, weight_decay, nesterov,
                         maximize, accum_steps, accum_reduction, grad_scale=None,
                         found_inf=None, **launch):
    window.launch(SGD_EXACT, grads, accum_steps=accum_steps, lr=lr, weight_decay=weight_decay,
                  maximize=maximize, accum_reduction=accum_reduction, momentum=momentum,
                  dampening=dampening, nesterov=nesterov, momentum_buffer=momentum != 0,
                  grad_scale=grad_scale, found_inf=found_inf, **launch)
