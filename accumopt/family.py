"""An optimizer family, declared once.

A family (SGD momentum, Adam, Tiger, Lion, Muon) is a thin optimizer class whose
``_variant(group)`` returns the :class:`Variant` a param group runs and whose ``_hyper(group)``
returns its hyperparameters. A Variant says everything the window (accumopt.window) needs to
know about the family's state and math:

* ``slots``: the per-parameter state tensors the variant folds into or moves with, in the order
  the functional form and the Triton launcher take them; ``created`` of them exist from a
  parameter's first fold on (zeros), ``kept_none`` are kept as None (torch.optim's
  ``momentum_buffer`` when momentum is 0), the rest stay absent (Adam's ``max_exp_avg_sq``
  without amsgrad) and reach the math as None;
* ``fold``: the functional micro-step (accumopt.functional), called as
  ``fold(params, grads, *slot_lists, [counts], first, update, **hyper, accum_steps=,
  accum_reduction=, grad_scale=, foreach=)``;
* ``kernel``: the Triton launcher beside it, called as ``kernel(window, grads, **hyper,
  accum_steps=, accum_reduction=, grad_scale=, found_inf=, **launch)`` (None: no kernel);
* ``averaged``: the slots that hold a parameter's window, which ``process_group`` averages
  across ranks and which must exist while a window is open;
* ``counter``: what the device's per-tensor update count stands for: ``"step"`` (torch's
  ``step``, Adam's bias corrections), ``"fresh"`` (SGD: no update has gone into the buffer
  yet, ``momentum_fresh``), or None;
* ``move_in_torch``: the kernels fold, but the window's last micro-step (fold and move) runs the
  functional form (sign, RMS and Newton–Schulz stay in torch).

From this the window derives both paths, the state_dict's per-parameter keys (torch's and the
window's, the same at every position), load validation, and the distributed average.
"""
import dataclasses
from typing import Callable, Optional, Tuple

import torch

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older torch
    def _get_scalar_dtype():
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

COUNTERS = ("step", "fresh", None)


def kernel(name):
    """The Triton launcher ``accumopt.kernels.<name>``, imported when first launched (Triton
    is optional: the torch path never imports it)."""
    found = []

    def launch(*args, **kwargs):
        if not found:
            from . import kernels
            found.append(getattr(kernels, name))
        return found[0](*args, **kwargs)
    launch.__name__ = launch.__qualname__ = name
    return launch


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    slots: Tuple[str, ...]
    fold: Callable
    kernel: Optional[Callable]
    averaged: Tuple[str, ...]
    created: Tuple[str, ...] = None      # default: every slot
    kept_none: Tuple[str, ...] = ()
    counter: Optional[str] = None
    move_in_torch: bool = False
    foreach: bool = True                 # the functional form has a multi-tensor form

    def __post_init__(self):
        if self.created is None:
            object.__setattr__(self, "created", tuple(k for k in self.slots
                                                      if k not in self.kept_none))
        assert self.counter in COUNTERS, self.counter
        assert set(self.averaged) <= set(self.created), (self.averaged, self.created)

    # ----- state ----------------------------------------------------------------------------

    def init_state(self, param, state):
        """Every key from the first fold on: the window's fold count, the counter, the slots."""
        state.setdefault("window_folds", 0)
        if self.counter == "step":
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            elif not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=_get_scalar_dtype())
        for key in self.kept_none:
            state.setdefault(key, None)
        for key in self.created:
            if state.get(key) is None:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if self.counter == "fresh" and key == "momentum_buffer":
                    state["momentum_fresh"] = True
        if self._fresh_kept():
            state.setdefault("momentum_fresh", False)

    def _fresh_kept(self):
        # SGD keeps ``momentum_fresh`` beside a buffer it creates (none with momentum 0).
        return self.counter == "fresh" and "momentum_buffer" in self.created

    def check_state(self, entry):
        """Raise ValueError (the message without the parameter) for an entry this variant cannot
        resume from."""
        for key in self.slots:
            value = entry.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                allowed = "a Tensor or None" if key in self.kept_none else "a Tensor"
                raise ValueError(f"{key} is {type(value).__name__} (must be {allowed})")
        if self.counter == "fresh":
            fresh = entry.get("momentum_fresh", False)
            if not isinstance(fresh, bool):
                raise ValueError(f"momentum_fresh is {fresh!r} (must be True or False)")
        if entry.get("window_folds"):
            for key in self.averaged:
                if not isinstance(entry.get(key), torch.Tensor):
                    raise ValueError(f"a window is open (window_folds > 0) but there is no "
                                     f"{key}")

    def window_tensors(self, state):
        """The state tensors that hold a parameter's window: what ranks average."""
        return [state[key] for key in self.averaged]

    # ----- the torch path -------------------------------------------------------------------

    def run(self, params, grads, states, first, update, hyper, as_real):
        lists = [[as_real(p) for p in params], [as_real(g) for g in grads]]
        lists += [[as_real(s.get(key)) for s in states] for key in self.slots]
        if self.counter == "step":
            lists.append([s["step"] for s in states])
        elif self.counter == "fresh":
            lists.append([s.get("momentum_fresh", False) for s in states])
        if not self.foreach:
            hyper = {k: v for k, v in hyper.items() if k != "foreach"}
        self.fold(*lists, first, update, **hyper)
        if self._fresh_kept():
            for state, moved in zip(states, update):
                if moved:
                    state["momentum_fresh"] = False

    # ----- the Triton path: the update count lives on the device -----------------------------

    def device_slots(self, state):
        return tuple(state.get(key) for key in self.slots)

    def initial_updates(self, state):
        if self.counter == "step":
            return float(state["step"])
        if self.counter == "fresh":
            return 0.0 if state.get("momentum_fresh", False) else 1.0
        return 1.0   # never "fresh": a momentum fold decays from the first window on

    def state_of_updates(self, updates):
        if self.counter == "step":
            # ``step`` as torch.optim keeps it: a CPU scalar tensor.
            return {"step": torch.tensor(float(updates), dtype=_get_scalar_dtype())}
        if self._fresh_kept():
            return {"momentum_fresh": updates == 0}
        return {}

    def tie_to_window(self, window, states):
        """A DeviceWindow was built over ``states``: ``step`` becomes a view of its counter."""
        if self.counter == "step":
            for i, state in enumerate(states):
                state["step"] = window.updates[i]
