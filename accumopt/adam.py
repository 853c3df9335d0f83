"""AccumAdam and AccumAdamW: Adam(W), gradient accumulation inside the optimizer."""
import numbers

import torch

from .functional.adam import adam_mean_of_squares_micro_step, adam_square_of_mean_micro_step
from .validation import SECOND_MOMENTS, as_float, check_betas, check_bool, check_choice, check_nonnegative
from .window import AccumOptimizer, as_real

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older torch
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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

    def _init_state(self, group, param, state):
        """Every key from the first fold on: torch.optim.Adam's (``step``, ``exp_avg``,
        ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad), the fold count and, for
        square_of_mean, the accumulator of Ḡ."""
        if "window_folds" not in state:
            state["window_folds"] = 0
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        elif not torch.is_tensor(state["step"]):
            state["step"] = torch.tensor(float(state["step"]), dtype=_get_scalar_dtype())
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()) \
                + (("grad_accum",) if group["second_moment"] == "square_of_mean" else ()):
            if key not in state:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

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
        for key in moments + [k for k in ("max_exp_avg_sq", "grad_accum") if k in entry]:
            if not isinstance(entry[key], torch.Tensor):
                raise ValueError(f"{key} is {type(entry[key]).__name__} (must be a Tensor)")
        if entry["window_folds"] and group["second_moment"] == "square_of_mean" and \
                "grad_accum" not in entry:
            raise ValueError("a window is open (window_folds > 0) but there is no grad_accum")
        if entry["window_folds"] and step is None:
            raise ValueError("a window is open (window_folds > 0) but there is no step")

    def _run_micro_step(self, group, params, grads, first, update, accum_steps, grad_scale):
        exact = group["second_moment"] == "square_of_mean"
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        hyper = dict(lr=as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"],
                     decoupled_weight_decay=group["decoupled_weight_decay"],
                     amsgrad=group["amsgrad"], maximize=group["maximize"],
                     accum_steps=accum_steps, accum_reduction=self._reduction(group),
                     grad_scale=grad_scale, foreach=self._use_foreach(group, params))
        tensors = [[as_real(p) for p in params], [as_real(g) for g in grads]]
        if exact:
            tensors.append([as_real(s["grad_accum"]) for s in states])
        tensors += [[as_real(s[key]) for s in states] for key in ("exp_avg", "exp_avg_sq")]
        tensors.append([as_real(s.get("max_exp_avg_sq")) for s in states])
        tensors.append([s["step"] for s in states])
        micro_step = adam_square_of_mean_micro_step if exact else adam_mean_of_squares_micro_step
        micro_step(*tensors, first, update, **hyper)

    def _window_state(self, group, state):
        if group["second_moment"] == "mean_of_squares":
            return [state["exp_avg"], state["exp_avg_sq"]]
        return [state["grad_accum"]]

    # The Triton path: the update count lives on the device, and ``step`` is a view of it.

    def _triton_slots(self, group, state):
        moments = (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
        if group["second_moment"] == "mean_of_squares":
            return moments
        return (state["grad_accum"],) + moments

    def _triton_initial_updates(self, group, state):
        return float(state["step"])

    def _triton_state(self, group, updates):
        # ``step`` as torch.optim keeps it: a CPU scalar tensor.
        return {"step": torch.tensor(float(updates), dtype=_get_scalar_dtype())}

    def _triton_built(self, window, states):
        for i, state in enumerate(states):
            state["step"] = window.updates[i]

    def _triton_launch(self, group, window, grads, accum_steps, grad_scale, found_inf, **launch):
        from . import kernels
        beta1, beta2 = group["betas"]
        micro_step = (kernels.adam_mean_of_squares_micro_step
                      if group["second_moment"] == "mean_of_squares"
                      else kernels.adam_square_of_mean_micro_step)
        micro_step(window, grads, lr=as_float(group["lr"]), beta1=beta1, beta2=beta2,
                   eps=group["eps"], weight_decay=group["weight_decay"],
                   decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=group["amsgrad"], maximize=group["maximize"],
                   accum_steps=accum_steps, accum_reduction=self._reduction(group),
                   grad_scale=grad_scale, found_inf=found_inf, **launch)


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
