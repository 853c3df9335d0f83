"""The window bookkeeping every accumopt optimizer shares.

A window is ``accum_steps`` good micro-batches. :class:`AccumOptimizer` counts them, decides per
parameter whether a micro-step is its first fold of the window (decay the moments) and whether
the window ends (move the parameter), takes GradScaler's scale and drop decision, and keeps all
of it in the state_dict. The subclasses only turn a planned micro-step into a call of their math.

Per-parameter bookkeeping lives in the parameter's state: ``window_folds`` counts the
micro-steps folded into it in the current window and is absent at a window boundary, so the
state at a boundary has exactly torch.optim's keys.
"""
import torch
from torch.optim import Optimizer

from .backend import check_backend
from .validation import check_accum_steps, check_window_args


class AccumOptimizer(Optimizer):
    """Base class of the accumopt optimizers: one ``step()`` per micro-batch, a parameter
    update every ``accum_steps`` of them.

    Subclasses define ``_check_group(group)`` for their own hyperparameters and
    ``_run_micro_step(group, params, grads, first, update, accum_steps, grad_scale)``, which folds
    ``grads`` (None: update-only) into the state of ``params`` and moves those with ``update``.
    """

    # step() unscales by GradScaler's grad_scale while folding and drops a micro-batch on its
    # found_inf, so GradScaler hands both over instead of unscaling and skipping itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, process_group=None):
        if process_group is not None:
            raise NotImplementedError("process_group: distributed windows are not built yet; "
                                      "pass process_group=None")
        super().__init__(params, defaults)
        self.process_group = process_group
        self._micro_step = 0              # good micro-batches folded into the current window
        self._window_accum_steps = None   # the current window's k, read at its first micro-step
        self.num_updates = 0              # windows completed: parameter updates so far
        self.updated = False              # whether the last step() moved the parameters

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for key, value in (("_micro_step", 0), ("_window_accum_steps", None),
                           ("num_updates", 0), ("updated", False), ("process_group", None)):
            self.__dict__.setdefault(key, value)

    def add_param_group(self, param_group):
        filled = {**self.defaults, **param_group}
        check_window_args(filled)
        self._check_group(filled)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if filled["fold_in_backward"]:
            raise NotImplementedError("fold_in_backward=True is not built yet; use step mode "
                                      "(fold_in_backward=False)")
        check_backend(filled["backend"], params)
        super().add_param_group(param_group)

    def _check_group(self, group):
        raise NotImplementedError

    def _run_micro_step(self, group, params, grads, first, update, accum_steps, grad_scale):
        raise NotImplementedError

    @property
    def micro_step(self):
        """Good micro-batches folded into the current window so far (0 at a boundary)."""
        return self._micro_step

    @torch.no_grad()
    def step(self, closure=None):
        """Fold this micro-batch's gradients; on every ``accum_steps``-th call, move the
        parameters. Sets ``updated`` and, on an update, increments ``num_updates``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [self._group_grads(i, group) for i, group in enumerate(self.param_groups)]
        accum_steps = self._window_accum_steps if self._micro_step else self._read_accum_steps()
        dropped, grad_scale = self._grad_scaler_decision()
        if dropped:
            self.updated = False
            return loss
        last = self._micro_step + 1 == accum_steps
        for group, group_grads in zip(self.param_groups, grads):
            self._fold_group(group, group_grads, accum_steps, last, grad_scale)
        self._window_accum_steps = accum_steps
        self._micro_step = 0 if last else self._micro_step + 1
        self.num_updates += last
        self.updated = last
        return loss

    def _fold_group(self, group, grads, accum_steps, last, grad_scale):
        """Plan one micro-step of a param group: which parameters fold, which fold first in this
        window, which move; run it; then advance each parameter's fold count."""
        params, planned_grads, first = [], [], []
        for param, grad in zip(group["params"], grads):
            folds = self.state[param].get("window_folds", 0)
            # A parameter with no gradient now still moves on the last micro-step if it got
            # gradients earlier in the window; one with none in the whole window stays put.
            if grad is None and not (last and folds):
                continue
            params.append(param)
            planned_grads.append(grad)
            first.append(folds == 0)
        if not params:
            return
        self._run_micro_step(group, params, planned_grads, first, [last] * len(params),
                         accum_steps, grad_scale)
        for param in params:
            state = self.state[param]
            if last:
                state.pop("window_folds", None)
            else:
                state["window_folds"] = state.get("window_folds", 0) + 1

    def _group_grads(self, index, group):
        grads = []
        for i, param in enumerate(group["params"]):
            grad = param.grad
            if grad is not None and grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(param {i} of param group {index} has one)")
            grads.append(grad)
        return grads

    def _read_accum_steps(self):
        """The k of a window that starts now: every group's ``accum_steps``, which must agree
        because a window (and ``updated``) spans the whole optimizer."""
        values = [group["accum_steps"] for group in self.param_groups]
        for value in values:
            check_accum_steps(value)
        if len(set(values)) != 1:
            raise ValueError(f"Invalid accum_steps: {values} differ between param groups; a "
                             f"window spans the whole optimizer, so set the same value in each")
        return values[0]

    def _grad_scaler_decision(self):
        """(drop this micro-batch?, the scale to divide gradients by or None), from the
        ``found_inf`` and ``grad_scale`` GradScaler.step() sets on the optimizer."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return True, None
        grad_scale = getattr(self, "grad_scale", None)
        return False, None if grad_scale is None else float(grad_scale)

    def state_dict(self):
        """torch.optim's state_dict plus the window position under ``"accum"``."""
        state_dict = super().state_dict()
        state_dict["accum"] = {"micro_step": self._micro_step,
                               "window_accum_steps": self._window_accum_steps,
                               "num_updates": self.num_updates}
        return state_dict

    def load_state_dict(self, state_dict):
        """Load an accumopt state_dict (at any micro-step) or a torch.optim one (a window
        boundary). Hyperparameters a torch.optim state_dict lacks keep their current values."""
        window = state_dict.get("accum", {"micro_step": 0, "window_accum_steps": None,
                                          "num_updates": 0})
        micro_step, window_k = window["micro_step"], window["window_accum_steps"]
        if micro_step:
            check_accum_steps(window_k)
            if not 0 < micro_step < window_k:
                raise ValueError(f"Invalid state_dict: micro_step {micro_step} is outside a "
                                 f"window of {window_k}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            state_dict = {**state_dict, "param_groups": [
                {**{key: group[key] for key in self.defaults}, **saved}
                for group, saved in zip(self.param_groups, saved_groups)]}
        super().load_state_dict(state_dict)
        self._micro_step, self._window_accum_steps = micro_step, window_k
        self.num_updates = window["num_updates"]

    def _use_foreach(self, params):
        """The multi-tensor form where torch has native foreach kernels, as torch.optim does."""
        return all(p.is_cuda for p in params)


def as_real(tensor):
    """Complex tensors are folded as their real views, as torch.optim does."""
    if tensor is not None and torch.is_complex(tensor):
        return torch.view_as_real(tensor)
    return tensor
