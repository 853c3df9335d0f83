"""AccumAdam and AccumAdamW: Adam(W), gradient accumulation inside the optimizer."""
import functools
import numbers

import torch

from .family import Variant, _get_scalar_dtype, kernel
from .functional.adam import adam_mean_of_squares_micro_step, adam_square_of_mean_micro_step
from .validation import (SECOND_MOMENTS, as_float, check_betas, check_bool, check_choice,
                         check_nonnegative)
from .window import AccumOptimizer


class AccumAdam(AccumOptimizer):
    r"""Adam whose ``step()`` is called once per micro-batch and moves the parameters once every
    ``accum_steps`` calls. Bias corrections count updates, not micro-steps.

    ``second_moment="mean_of_squares"`` (default, no gradient buffer, Su's rule): each window
    folds m ← β1·m + (1-β1)·Ḡ and v ← β2·v + (1-β2)·mean_t(g_t²) micro-batch by micro-batch,
    then θ ← θ - lr·m̂/(√v̂ + eps). v is larger than Ḡ² when micro-batch gradients disagree, so
    steps are smaller than standard accumulation's (Wang & Aitchison, arXiv 2402.18824). With
    accum_steps=1 it is torch.optim.Adam exactly.

    ``second_moment="square_of_mean"``: one accumulator of Ḡ (state ``grad_accum``) and torch.optim.Adam's step on it; after each window everything equals torch.optim.Adam
    stepped once with Ḡ.

    Coupled weight decay adds λθ to every micro-batch gradient before folding;
    ``decoupled_weight_decay=True`` applies θ ← θ·(1 - lr·λ) once per update (AdamW).
    Args mirror torch.optim.Adam (``amsgrad`` positional as there; ``foreach`` picks the torch
    path's multi-tensor form, ``fused=True`` the Triton kernels; ``capturable`` and
    ``differentiable`` must be False), plus ``accum_steps``, ``accum_reduction`` ("mean" or "sum"),
    ``second_moment``, ``fold_in_backward``, ``backend`` and ``process_group``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, decoupled_weight_decay=False, maximize=False, foreach=None,
                 capturable=False, differentiable=False, fused=None, accum_steps=1,
                 accum_reduction="mean", second_moment="mean_of_squares",
                 fold_in_backward=False, step_per_window=False, max_grad_norm=None,
                 backend="auto", process_group=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, accum_steps=accum_steps,
                        accum_reduction=accum_reduction, second_moment=second_moment,
                        fold_in_backward=fold_in_backward, step_per_window=step_per_window,
                        max_grad_norm=max_grad_norm, backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group):
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_bool("amsgrad", group["amsgrad"])
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_choice("second_moment", group["second_moment"], SECOND_MOMENTS)
        if group["max_grad_norm"] is not None and group["second_moment"] != "square_of_mean":
            raise ValueError("Invalid max_grad_norm: window clipping needs the window gradient, "
                             "which second_moment=\"mean_of_squares\" never holds (it folds "
                             "each micro-batch into m and v). Use second_moment="
                             "\"square_of_mean\" (it keeps Ḡ), or max_grad_norm=None")

    def _variant(self, group):
        return _adam_variant(group["second_moment"], group["amsgrad"])

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"])

    def _check_state(self, group, param, entry):
        step = entry.get("step")
        if step is not None:
            if isinstance(step, torch.Tensor):
                ok = step.numel() == 1 and not step.is_complex()
                value = float(step) if ok else None
            else:
                ok = isinstance(step, numbers.Real) and not isinstance(step, bool)
                value = float(step) if ok else None
            if not ok or not value >= 0 or value != int(value):
                raise ValueError(f"step is {step!r} (must be a whole number >= 0)")
            if not isinstance(step, torch.Tensor):
                # torch.optim.Adam keeps step as a tensor; older checkpoints hold a number.
                entry["step"] = torch.tensor(value, dtype=_get_scalar_dtype())
        moments = [key for key in ("exp_avg", "exp_avg_sq") if key in entry]
        if step is not None and len(moments) != 2:
            raise ValueError("it has a step but not both of exp_avg and exp_avg_sq")
        super()._check_state(group, param, entry)
        if entry["window_folds"] and step is None:
            raise ValueError("a window is open (window_folds > 0) but there is no step")


@functools.lru_cache(maxsize=None)
def _adam_variant(second_moment, amsgrad):
    """mean_of_squares folds into m and v (bufferless); square_of_mean keeps the accumulator of
    Ḡ (``grad_accum``) and runs torch.optim.Adam's step on it. ``max_exp_avg_sq`` exists with
    amsgrad; ``step`` counts updates, on the device on the Triton path."""
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    created = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    if second_moment == "mean_of_squares":
        return Variant("adam mean_of_squares", moments, adam_mean_of_squares_micro_step,
                       kernel("adam_mean_of_squares_micro_step"),
                       averaged=("exp_avg", "exp_avg_sq"), created=created, counter="step")
    return Variant("adam square_of_mean", ("grad_accum",) + moments,
                   adam_square_of_mean_micro_step, kernel("adam_square_of_mean_micro_step"),
                   averaged=("grad_accum",), created=("grad_accum",) + created, counter="step")


class AccumAdamW(AccumAdam):
    """AccumAdam with decoupled weight decay (θ ← θ·(1 - lr·λ) once per update) and
    weight_decay=1e-2 by default, as torch.optim.AdamW is to torch.optim.Adam: decoupled
    whatever a param group or a loaded state_dict says."""

    _fixed_options = {"decoupled_weight_decay": True}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, accum_steps=1, accum_reduction="mean",
                 second_moment="mean_of_squares", fold_in_backward=False,
                 step_per_window=False, max_grad_norm=None, backend="auto",
                 process_group=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         decoupled_weight_decay=True, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         accum_steps=accum_steps, accum_reduction=accum_reduction,
                         second_moment=second_moment, fold_in_backward=fold_in_backward,
                         step_per_window=step_per_window, max_grad_norm=max_grad_norm,
                         backend=backend, process_group=process_group)
