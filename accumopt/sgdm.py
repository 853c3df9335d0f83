"""AccumSGDM: SGD with momentum, gradient accumulation inside the optimizer."""
import torch

from .functional.sgd import sgd_exact_micro_step, sgdm_micro_step
from .validation import as_float, check_bool, check_nonnegative
from .window import AccumOptimizer, as_real


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

    def _init_state(self, group, param, state):
        """Every key from the first fold on: the momentum buffer (None when momentum is 0, as
        torch.optim.SGD keeps it), ``momentum_fresh`` (no update has gone into the buffer yet:
        torch's first step copies the gradient in without dampening), the fold count and, for
        nesterov and momentum=0, the accumulator of Ḡ."""
        if "window_folds" not in state:
            state["window_folds"] = 0
        if group["momentum"] == 0:
            state.setdefault("momentum_buffer", None)
        elif state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["momentum_fresh"] = True
        else:
            state.setdefault("momentum_fresh", False)
        if not _bufferless(group) and "grad_accum" not in state:
            state["grad_accum"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _check_state(self, group, param, entry):
        buf = entry.get("momentum_buffer")
        if buf is not None and not isinstance(buf, torch.Tensor):
            raise ValueError(f"momentum_buffer is {type(buf).__name__} (must be a Tensor or None)")
        fresh = entry.get("momentum_fresh", False)
        if not isinstance(fresh, bool):
            raise ValueError(f"momentum_fresh is {fresh!r} (must be True or False)")
        if entry["window_folds"] and not _bufferless(group) and \
                not isinstance(entry.get("grad_accum"), torch.Tensor):
            raise ValueError("a window is open (window_folds > 0) but there is no grad_accum")
        if entry["window_folds"] and _bufferless(group) and buf is None:
            raise ValueError("a window is open (window_folds > 0) but there is no "
                             "momentum_buffer")

    def _run_micro_step(self, group, params, grads, first, update, accum_steps, grad_scale):
        momentum = group["momentum"]
        hyper = dict(lr=as_float(group["lr"]), momentum=momentum, dampening=group["dampening"],
                     weight_decay=group["weight_decay"], maximize=group["maximize"],
                     accum_steps=accum_steps, accum_reduction=self._reduction(group),
                     grad_scale=grad_scale, foreach=self._use_foreach(group, params))
        states = [self.state[p] for p in params]
        fresh = [state.get("momentum_fresh", False) for state in states]
        if _bufferless(group):
            # The buffer is the accumulator; a fresh one takes the window without dampening.
            sgdm_micro_step([as_real(p) for p in params], [as_real(g) for g in grads],
                            [as_real(s["momentum_buffer"]) for s in states], fresh, first,
                            update, **hyper)
        else:
            sgd_exact_micro_step([as_real(p) for p in params], [as_real(g) for g in grads],
                                 [as_real(s["grad_accum"]) for s in states],
                                 [as_real(s["momentum_buffer"]) for s in states],
                                 [f and moved for f, moved in zip(fresh, update)], first,
                                 update, nesterov=group["nesterov"], **hyper)
        for state, moved in zip(states, update):
            if moved and momentum != 0:
                state["momentum_fresh"] = False

    def _window_state(self, group, state):
        return [state["momentum_buffer"] if _bufferless(group) else state["grad_accum"]]

    # The Triton path: "fresh" (no update yet) is a zero update count on the device.

    def _triton_slots(self, group, state):
        if _bufferless(group):
            return (state["momentum_buffer"],)
        return state["grad_accum"], state["momentum_buffer"]

    def _triton_initial_updates(self, group, state):
        return 0.0 if state.get("momentum_fresh", False) else 1.0

    def _triton_state(self, group, updates):
        return {"momentum_fresh": updates == 0} if group["momentum"] != 0 else {}

    def _triton_launch(self, group, window, grads, accum_steps, grad_scale, found_inf, **launch):
        from . import kernels
        hyper = dict(lr=as_float(group["lr"]), momentum=group["momentum"],
                     dampening=group["dampening"], weight_decay=group["weight_decay"],
                     maximize=group["maximize"], accum_steps=accum_steps,
                     accum_reduction=self._reduction(group), grad_scale=grad_scale,
                     found_inf=found_inf, **launch)
        if _bufferless(group):
            kernels.sgdm_micro_step(window, grads, **hyper)
        else:
            kernels.sgd_exact_micro_step(window, grads, nesterov=group["nesterov"], **hyper)


def _bufferless(group):
    return group["momentum"] != 0 and not group["nesterov"]
