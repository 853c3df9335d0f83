"""AccumSGDM: SGD with momentum, gradient accumulation inside the optimizer."""
from .family import Variant, kernel
from .functional.sgd import sgd_exact_micro_step, sgdm_micro_step
from .validation import as_float, check_bool, check_nonnegative
from .window import AccumOptimizer


class AccumSGDM(AccumOptimizer):
    r"""SGD with momentum whose ``step()`` is called once per micro-batch and moves the
    parameters once every ``accum_steps`` calls.

    After each window the parameters and ``momentum_buffer`` equal torch.optim.SGD stepped once
    with the window gradient Ḡ (the mean of the micro-batch gradients, or their sum with
    ``accum_reduction="sum"``), for every combination of momentum, dampening, weight_decay,
    nesterov and maximize, including torch's rule that the first step copies the gradient into
    the buffer without dampening.

    With momentum > 0 and nesterov=False it holds no gradient buffer (Su's χ-indicator rule):
    each micro-batch gradient is folded straight into the momentum buffer,

        first fold of a window:  buf ← μ·buf + (1-τ)·(w·g + λθ)
        later folds:             buf ← buf + (1-τ)·w·g
        last micro-step:         θ ← θ - lr·buf

    with w = 1/accum_steps (or 1 for "sum"). Nesterov needs Ḡ itself and momentum = 0 has no
    moment to fold into, so both keep one accumulator (state ``grad_accum``, inside a window).

    Args mirror torch.optim.SGD (``foreach`` picks the torch path's multi-tensor form,
    ``fused=True`` the Triton kernels; ``differentiable`` and ``capturable`` must be False), plus ``accum_steps`` (micro-batches per window, per param group,
    taking effect at the next window), ``accum_reduction`` ("mean" or "sum"),
    ``fold_in_backward``, ``backend`` ("auto", "triton", "torch") and ``process_group``.
    """

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, capturable=False, accum_steps=1, accum_reduction="mean",
                 fold_in_backward=False, step_per_window=False, max_grad_norm=None,
                 backend="auto", process_group=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused,
                        capturable=capturable, accum_steps=accum_steps,
                        accum_reduction=accum_reduction, fold_in_backward=fold_in_backward,
                        step_per_window=step_per_window, max_grad_norm=max_grad_norm,
                        backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group):
        check_nonnegative("momentum", group["momentum"])
        check_nonnegative("dampening", group["dampening"])
        check_bool("nesterov", group["nesterov"])
        if group["max_grad_norm"] is not None and _bufferless(group):
            raise ValueError("Invalid max_grad_norm: window clipping needs the window gradient, "
                             "which bufferless SGD momentum (momentum > 0, nesterov=False) never "
                             "holds: its momentum buffer is the accumulator. Use nesterov=True "
                             "or momentum=0 (they keep Ḡ), or max_grad_norm=None")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: True requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']!r}, "
                             f"dampening={group['dampening']!r})")

    def _variant(self, group):
        if _bufferless(group):
            return SGDM
        return SGD_EXACT if group["momentum"] != 0 else SGD_EXACT_NO_MOMENTUM

    def _hyper(self, group):
        hyper = dict(lr=as_float(group["lr"]), momentum=group["momentum"],
                     dampening=group["dampening"], weight_decay=group["weight_decay"],
                     maximize=group["maximize"])
        if not _bufferless(group):
            hyper["nesterov"] = group["nesterov"]
        return hyper


# The buffer is the accumulator; ``momentum_fresh`` (no update into it yet: torch's first step
# copies the gradient in without dampening) is a zero update count on the device.
SGDM = Variant("sgd momentum", ("momentum_buffer",), sgdm_micro_step, kernel("sgdm_micro_step"),
               averaged=("momentum_buffer",), counter="fresh")
# Nesterov and momentum = 0 keep the accumulator of Ḡ and run torch.optim.SGD's step on it; the
# buffer is None with momentum = 0, as torch.optim.SGD keeps it.
SGD_EXACT = Variant("sgd exact", ("grad_accum", "momentum_buffer"), sgd_exact_micro_step,
                    kernel("sgd_exact_micro_step"), averaged=("grad_accum",), counter="fresh")
SGD_EXACT_NO_MOMENTUM = Variant("sgd", ("grad_accum", "momentum_buffer"), sgd_exact_micro_step,
                                kernel("sgd_exact_micro_step"), averaged=("grad_accum",),
                                kept_none=("momentum_buffer",), counter="fresh")


def _bufferless(group):
    return group["momentum"] != 0 and not group["nesterov"]
