"""AccumSGDM: SGD with momentum, gradient accumulation inside the optimizer."""
import torch

from .functional.sgd import sgd_exact_micro_step, sgdm_micro_step
from .validation import check_bool, check_nonnegative
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

    Args mirror torch.optim.SGD, plus ``accum_steps`` (micro-batches per window, per param group,
    taking effect at the next window), ``accum_reduction`` ("mean" or "sum"),
    ``fold_in_backward``, ``backend`` ("auto", "triton", "torch") and ``process_group``.
    """

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, accum_steps=1, accum_reduction="mean",
                 fold_in_backward=False, backend="auto", process_group=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        accum_steps=accum_steps, accum_reduction=accum_reduction,
                        fold_in_backward=fold_in_backward, backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group):
        check_nonnegative("momentum", group["momentum"])
        check_nonnegative("dampening", group["dampening"])
        check_bool("nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: True requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']!r}, "
                             f"dampening={group['dampening']!r})")

    def _run_micro_step(self, group, params, grads, first, update, accum_steps, grad_scale):
        momentum = group["momentum"]
        hyper = dict(lr=group["lr"], momentum=momentum, dampening=group["dampening"],
                     weight_decay=group["weight_decay"], maximize=group["maximize"],
                     accum_steps=accum_steps, accum_reduction=group["accum_reduction"],
                     grad_scale=grad_scale, foreach=self._use_foreach(params))
        states = [self.state[p] for p in params]
        if _bufferless(group):
            # Bufferless: a buffer made in this window is "fresh" until the update (torch's
            # first step copies the gradient in without dampening).
            for p, state, is_first in zip(params, states, first):
                if is_first and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                    state["momentum_fresh"] = True
            fresh = [state.get("momentum_fresh", False) for state in states]
            sgdm_micro_step([as_real(p) for p in params], [as_real(g) for g in grads],
                            [as_real(s["momentum_buffer"]) for s in states], fresh, first,
                            update, **hyper)
            for state, moved in zip(states, update):
                if moved:
                    state.pop("momentum_fresh", None)
            return
        fresh = []
        for p, state, is_first, moved in zip(params, states, first, update):
            if is_first and not moved:
                state["grad_accum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            fresh.append(moved and momentum != 0 and state.get("momentum_buffer") is None)
            if fresh[-1]:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        sgd_exact_micro_step([as_real(p) for p in params], [as_real(g) for g in grads],
                             [as_real(s.get("grad_accum")) for s in states],
                             [as_real(s.get("momentum_buffer")) for s in states], fresh, first,
                             update, nesterov=group["nesterov"], **hyper)
        for state, moved in zip(states, update):
            if moved:
                state.pop("grad_accum", None)

    def _window_state(self, group, state):
        return [state["momentum_buffer"] if _bufferless(group) else state["grad_accum"]]

    # The Triton path: the kernels need every state tensor allocated up front, and keep
    # "fresh" (no update yet) as a zero update count on the device.

    def _triton_slots(self, group, param, state):
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(param)
            state["momentum_fresh"] = True
        if _bufferless(group):
            return (state["momentum_buffer"],)
        if "grad_accum" not in state:
            state["grad_accum"] = torch.zeros_like(param)
        return state["grad_accum"], state.get("momentum_buffer")

    def _triton_initial_updates(self, state):
        return 0.0 if state.pop("momentum_fresh", False) else 1.0

    def _triton_launch(self, group, window, grads, accum_steps, grad_scale, found_inf, **launch):
        from . import kernels
        hyper = dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                     weight_decay=group["weight_decay"], maximize=group["maximize"],
                     accum_steps=accum_steps, accum_reduction=group["accum_reduction"],
                     grad_scale=grad_scale, found_inf=found_inf, **launch)
        if _bufferless(group):
            kernels.sgdm_micro_step(window, grads, **hyper)
        else:
            kernels.sgd_exact_micro_step(window, grads, nesterov=group["nesterov"], **hyper)

    def _triton_export(self, group, entry, folds, updates):
        """Give a state_dict entry the torch path's shape: no buffer before the first update
        (a bufferless one mid-window is marked fresh), no accumulator at a boundary."""
        if updates == 0:
            if _bufferless(group) and folds:
                entry["momentum_fresh"] = True
            else:
                entry.pop("momentum_buffer", None)
        if not folds:
            entry.pop("grad_accum", None)


def _bufferless(group):
    return group["momentum"] != 0 and not group["nesterov"]
