"""The window bookkeeping every accumopt optimizer shares.

A window is ``accum_steps`` good micro-batches. :class:`AccumOptimizer` counts them, decides per
parameter whether a micro-step is its first fold of the window (decay the moments) and whether
the window ends (move the parameter), takes GradScaler's scale and drop decision, and keeps all
of it in the state_dict, in copies and in pickles. The subclasses only turn a planned micro-step
into a call of their math.

Per-parameter state holds torch.optim's keys and, beside them, the window's: ``window_folds``
(micro-steps folded into the parameter in the current window, 0 at a boundary) and whatever
the variant folds into besides torch's moments (an exact variant's ``grad_accum``, SGD's
``momentum_fresh``). Every key exists from a parameter's first fold on, so a state_dict has the
same per-parameter keys at every window position.

With ``fold_in_backward`` the micro-step's folds happen inside backward, one parameter at a time
as autograd finishes its gradient (:mod:`accumopt.backward_hooks`), with the same per-parameter
plan as step mode; ``step()`` then moves the parameters that got a gradient earlier in the window
but none now, and advances the window. A state_dict (or copy) taken between backward and
``step()`` holds the folds already made; the ``step()`` that follows, on the same optimizer or on
one resumed from it, completes the micro-step.

On the Triton path the per-parameter counters live on the device, in one
:class:`accumopt.kernels.DeviceWindow` per bucket (a group's tensors of one device and dtype), so
that a GradScaler can drop a micro-batch without a host sync. The host keeps a mirror of the
window position while it can know it; after a step whose drop only the device knows, reading
``updated``, ``num_updates`` or ``micro_step`` syncs it back. A DeviceWindow's counters are
written back into the host state whenever it is retired (its tensors changed, its group moved to
the torch path) and into every state_dict and copy.
"""
import copy
import functools
import gc
import itertools
import numbers
import operator
import sys
import warnings
import weakref
from collections import defaultdict

import torch
from torch.optim import Optimizer

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5 keeps it private; builds without distributed have none
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = ()

from . import backward_hooks
from .backend import check_backend, triton_can_run
from .validation import (RUNTIME_OPTIONS, as_float, check_accum_steps, check_nonnegative_int,
                         check_window_args)

_INT32_MAX = 2 ** 31 - 1
_data_ptr = torch.Tensor.data_ptr
# The gradient row's marks (accumopt.kernels.micro_step): folded by a hook this micro-step (and
# moved on the last), and folded for an export without moving.
HOOKED, FOLDED = 1, 2
# The window position's key in every param group of a state_dict (beside the top-level "accum",
# which torch.distributed.checkpoint drops).
WINDOW_KEY = "accum_window"


class AccumOptimizer(Optimizer):
    """Base class of the accumopt optimizers: one ``step()`` per micro-batch, a parameter
    update every ``accum_steps`` of them.

    A family subclasses it with ``_check_group(group)`` for its own hyperparameters,
    ``_variant(group)``, the :class:`accumopt.family.Variant` a param group runs (its state
    slots, its fold and its move), and ``_hyper(group)``, the hyperparameters both of the
    variant's paths take. Everything else (state keys, both paths, state_dict shaping, load
    validation, the distributed average) follows from the Variant. ``_check_state(group, param,
    entry)`` may add checks of its own; ``_fixed_options`` are group options the class forces
    whatever it is given or loads.
    """

    # step() unscales by GradScaler's grad_scale while folding and drops a micro-batch on its
    # found_inf, so GradScaler hands both over instead of unscaling and skipping itself.
    _step_supports_amp_scaling = True
    _fixed_options = {}

    def __init__(self, params, defaults, *, process_group=None):
        if params is not None and not isinstance(params, torch.Tensor):
            params = list(params)     # (as torch.optim reads it; a generator is read once)
        if params is None or isinstance(params, torch.Tensor) or not any(
                isinstance(g, dict) for g in params):
            # One group of the defaults: checked before params is, as torch.optim checks them.
            # (Param group dicts may override what the defaults alone would get wrong: each is
            # checked with its own values when it is added.)
            filled = {**defaults, **self._fixed_options}
            check_window_args(filled)
            self._check_group(filled)
        self._hook_handles = []           # fold_in_backward hooks, filled by add_param_group
        backward_hooks.release_on_collect(self, self._hook_handles)
        self._hook_routes = {}            # id(param) -> its hook's backward_hooks.HookRoute
        self._group_index = {}            # parameter -> index of its param group
        self._averager = None             # averages windows across ranks (process_group)
        if process_group is not None:
            from .distributed import WindowAverager
            self._averager = WindowAverager(process_group)
        self._init_transient()
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.remove_hooks()
            raise
        self.process_group = process_group
        if self._averager is not None:
            self._averager.check_identical(self._all_params())

    def _init_transient(self):
        """The window position and the caches: what a copy or a load sets afresh."""
        self._micro_step = 0              # good micro-batches folded into the current window
        self._window_accum_steps = None   # the current window's k, read when the window opens
        self._window_open = False         # k read (by a hook or step) and the window not ended
        self._num_updates = 0             # windows completed: parameter updates so far
        self._updated = False             # whether the last step() moved the parameters
        self._window_known = True         # False after a step only the device knew the drop of
        self._device_windows = {}         # (group index, device, dtype) -> DeviceWindow
        # id -> parameter the full path of a hook folded in this micro-step (the short way's
        # are marked in their DeviceWindow's row instead: see _was_hooked)
        self._hooked = {}
        for route in self.__dict__.get("_hook_routes", {}).values():
            route.take = None             # the windows are dropped: no short way to them
        self._micro_step_cache = {}       # per-micro-step answers the hooks reuse
        # id(group) -> (group, its hyperparameters as this micro-step first read them): part
        # of the window position (a copy or checkpoint between backward and step() keeps them)
        self._hyper_read = {}
        self._plans = {}                  # group index -> _TritonPlan (Triton path)
        # step_per_window: the autograd graph tasks of this micro-step's backward (id -> ended)
        self._backward_tasks = {}
        self._backward_max_task = -1      # the newest graph task a hook has run in
        self._backward_ended = False      # this micro-step's backward has ended; not counted yet
        self._distributed_check = None    # None: not checked yet; "": fine; else the refusal
        self._window_lrs = []             # each group's lr when the window opened
        self.__dict__.setdefault("grad_norm", None)  # the last clipped window's norm
        self._short_window = None         # step_per_window: the last window's length if short
        self.__dict__.setdefault("_short_warned", False)
        self.__dict__.setdefault("_lr_warned", False)  # the lr-in-window warning, once

    # ----- copies and pickles -----------------------------------------------------------------

    def __getstate__(self):
        """torch.optim's pickled state plus the window position; the per-parameter state as
        state_dict() shapes it (device counters written in, a pending stash folded)."""
        self._sync_window()
        self._flush_stashes()
        overrides = self._device_state()
        # (An entry that is not a parameter's dict, e.g. a flag a hook keeps in opt.state as
        # torch's own tests do, is copied as it is.)
        state = {p: {**entry, **overrides.get(p, {})} if isinstance(entry, dict) else entry
                 for p, entry in self.state.items()}
        return {"defaults": self.defaults, "state": state, "param_groups": self.param_groups,
                "accum": self._position(), "accum_hooked": self._hooked_params(),
                "process_group": self.process_group, "grad_norm": self.grad_norm}

    def __deepcopy__(self, memo):
        # A process group is shared by the copy, never copied.
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __setstate__(self, state):
        state = dict(state)
        position = state.pop("accum", None)
        hooked = state.pop("accum_hooked", ())
        process_group = state.pop("process_group", None)
        torch_added = "differentiable" not in state["defaults"]
        super().__setstate__(state)
        if torch_added:     # torch's __setstate__ adds it; a copy keeps the original's keys
            self.defaults.pop("differentiable", None)
        state_of = self.state
        self.state = defaultdict(dict)
        self.state.update(state_of)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.update(self._fixed_options)
        self._init_transient()
        if position is not None:
            self._set_position(position)
        self._hooked = {id(p): p for p in hooked}
        self._group_index = {p: i for i, group in enumerate(self.param_groups)
                             for p in group["params"]}
        self._hook_handles = []
        backward_hooks.release_on_collect(self, self._hook_handles)
        self._hook_routes = {}
        for index, group in enumerate(self.param_groups):
            if group["fold_in_backward"]:
                backward_hooks.check_unclaimed(self, group["params"], index)
                self._hook_handles += backward_hooks.register_fold_hooks(
                    self, group["params"], self._hook_routes)
        self.process_group = process_group
        self._averager = None
        if process_group is not None:
            from .distributed import WindowAverager
            self._averager = WindowAverager(process_group)
            self._averager.set_params(self._all_params())

    # ----- the window position ------------------------------------------------------------------

    @property
    def updated(self):
        """Whether the last ``step()`` moved the parameters."""
        self._sync_window()
        return self._updated

    @property
    def num_updates(self):
        """Parameter updates (completed windows) so far."""
        self._sync_window()
        return self._num_updates

    @property
    def micro_step(self):
        """Good micro-batches folded into the current window so far (0 at a boundary); with
        step_per_window, the backward passes folded so far."""
        self._sync_window()
        return self._micro_step + self._backward_ended

    def _position(self):
        # step_per_window: a backward that has ended but is not counted yet (the next one's
        # first hook, or step(), counts it) is saved as such.
        position = {"micro_step": self._micro_step,
                    "window_accum_steps": self._window_accum_steps,
                    "num_updates": self._num_updates, "updated": self._updated,
                    "backward_ended": self._backward_ended}
        # Between backward and step() in fold_in_backward mode: the hyperparameters the hooks
        # read, which the rest of the micro-step keeps (see _hyper_values).
        reads = [self._hyper_read.get(id(group), (None, None)) for group in self.param_groups]
        reads = [dict(values) if read is group else None
                 for group, (read, values) in zip(self.param_groups, reads)]
        if any(values is not None for values in reads):
            position["hyper_read"] = reads
        return position

    def _set_position(self, position):
        self._micro_step = position["micro_step"]
        self._window_accum_steps = position["window_accum_steps"]
        self._num_updates = position["num_updates"]
        self._updated = position.get("updated", False)
        self._backward_ended = position.get("backward_ended", False)
        self._window_open = self._micro_step > 0 or self._backward_ended
        self._window_known = True
        for group, values in zip(self.param_groups, position.get("hyper_read") or ()):
            if values is not None:
                self._hyper_read[id(group)] = (group, dict(values))

    def _sync_window(self):
        """Read the window position back from the device after steps whose GradScaler drop
        decision only the device knew (one sync; none otherwise)."""
        if self._window_known:
            return
        window = next(iter(self._device_windows.values()))
        micro_step, window_k, updated, num_updates = window.position()
        # k 0: the device has not opened a window yet (only dropped micro-batches so far).
        self._micro_step, self._window_accum_steps = micro_step, window_k or None
        self._updated, self._num_updates = bool(updated), num_updates
        self._window_open = micro_step > 0
        self._window_known = True

    def _accum_steps_now(self):
        """The current window's accum_steps, read from the param groups when the window opens
        (at its first hook or step) and fixed until it ends."""
        if not self._window_open:
            self._window_accum_steps = self._read_accum_steps()
            self._window_open = True
            self._window_lrs = [_lr_key(g["lr"]) for g in self.param_groups]
        return self._window_accum_steps

    def _check_lr_in_window(self):
        """Warn once if a group's lr changed while a window is open: the symptom of an LR
        scheduler stepped once per micro-batch."""
        if self._lr_warned or not self._window_open or self._step_per_window():
            return
        for index, (group, before) in enumerate(zip(self.param_groups, self._window_lrs)):
            now = _lr_key(group["lr"])
            if now != before:
                self._lr_warned = True
                warnings.warn(
                    f"the lr of param group {index} changed from {before} to {now} inside an "
                    f"accumulation window (micro-batch {self._micro_step + 1} of "
                    f"{self._window_accum_steps}); the parameters move once per window, with "
                    f"the lr at its last micro-batch. A scheduler stepped once per micro-batch "
                    f"runs accum_steps times too fast: wrap it in accumopt.per_update(scheduler) "
                    f"or step it only when opt.updated", UserWarning, stacklevel=4)
                return

    # ----- param groups and hooks ---------------------------------------------------------------

    def add_param_group(self, param_group):
        filled = {**self.defaults, **param_group, **self._fixed_options}
        check_window_args(filled)
        self._check_group(filled)
        for key in ("step_per_window", "max_grad_norm"):
            if self.param_groups and filled[key] != self.param_groups[0][key]:
                raise ValueError(f"Invalid {key}: {filled[key]!r} differs from the other param "
                                 f"groups' ({self.param_groups[0][key]!r}); it is one choice for "
                                 f"the whole optimizer, whose window spans every group")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead (param_group 'params' is a set)")
        # A generator is read once, here: the group keeps the list.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = param_tensors(params)
        self._check_params(tensors)
        check_backend(self._backend_of(filled), tensors)
        index = len(self.param_groups)
        if filled["fold_in_backward"]:
            backward_hooks.check_unclaimed(self, tensors, index)
        super().add_param_group({**param_group, "params": params, **self._fixed_options})
        self._group_index.update((p, index) for p in self.param_groups[index]["params"])
        if filled["fold_in_backward"]:
            self._hook_handles += backward_hooks.register_fold_hooks(
                self, self.param_groups[index]["params"], self._hook_routes)
        if self._averager is not None:
            self._averager.set_params(self._all_params())

    @staticmethod
    def _backend_of(group):
        """The group's backend, with torch's ``fused=True`` meaning the Triton kernels."""
        return "triton" if group.get("fused") else group["backend"]

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def remove_hooks(self):
        """Remove the fold_in_backward hooks: gradients then stay in ``.grad``, as without
        accumopt, and another fold_in_backward optimizer may take the parameters over. A dropped
        optimizer's hooks are removed when it is collected."""
        backward_hooks.release(self, self._all_params() if hasattr(self, "param_groups") else [],
                               self._hook_handles)
        self.__dict__.get("_hook_routes", {}).clear()

    # ----- subclass interface -------------------------------------------------------------------

    def _check_group(self, group):
        raise NotImplementedError

    def _check_params(self, params):
        """A family's own check of a param group's tensors (ValueError), before it is added."""

    def _variant(self, group):
        raise NotImplementedError

    def _hyper(self, group):
        raise NotImplementedError

    # ----- what the variant declares, for the window ------------------------------------------

    def _init_state(self, group, param, state):
        self._variant(group).init_state(param, state)

    def _check_state(self, group, param, entry):
        self._variant(group).check_state(entry)

    def _run_micro_step(self, group, params, states, grads, first, update, accum_steps,
                        grad_scale):
        """Fold ``grads`` (None: update-only) into ``states``, those of ``params``, and move the
        parameters with ``update``: the variant's functional form."""
        hyper = dict(self._hyper_values(group), accum_steps=accum_steps,
                     accum_reduction=self._reduction(group), grad_scale=grad_scale,
                     foreach=self._use_foreach(group, params))
        # Complex parameters are folded as real views; most groups hold none (one check).
        real = as_real if any(map(torch.is_complex, params)) else _same
        self._variant(group).run(params, grads, states, first, update, hyper, real)

    def _hyper_values(self, group):
        """``_hyper(group)`` as this micro-step first read it (in fold_in_backward mode its first
        hook: a change between backward and step() takes effect in the next micro-step, on
        every tensor alike, whether its hook moved it or step() does), with every one-element
        Tensor hyperparameter (betas, eps, a weight_decay of any one-element shape, as
        torch.optim accepts) as a Python number: the math broadcasts none of them into a state
        tensor's shape."""
        read = self._hyper_read.get(id(group))
        if read is not None and read[0] is group:    # (a group loaded since has another id)
            return read[1]
        hyper = self._hyper(group)
        if any(isinstance(v, torch.Tensor) for v in hyper.values()):
            hyper = {k: as_float(v) if isinstance(v, torch.Tensor) else v
                     for k, v in hyper.items()}
        self._hyper_read[id(group)] = (group, hyper)
        return hyper

    def _window_state(self, group, state):
        """The state tensors that hold a parameter's window: what ranks average."""
        return self._variant(group).window_tensors(state)

    def _triton_launch(self, group, window, grads, accum_steps, grad_scale, found_inf, **launch):
        """The variant's Triton launcher (``launch``: DeviceWindow.launch's ``hook_tensor`` /
        ``flush`` / ``fold_only``)."""
        self._variant(group).kernel(window, grads, **self._hyper_values(group),
                                    accum_steps=accum_steps,
                                    accum_reduction=self._reduction(group),
                                    grad_scale=grad_scale, found_inf=found_inf, **launch)

    # ----- step -------------------------------------------------------------------------------

    def step(self, closure=None):
        """Fold this micro-batch's gradients (those hooks have not folded already); on every
        ``accum_steps``-th call, move the parameters. Sets ``updated`` and, on an update,
        increments ``num_updates``."""
        # torch.no_grad(), without its decorator's per-call objects.
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._step(closure)
        except BaseException:
            # GradScaler deletes the scale it handed over only after a step() that returned:
            # never leave it behind for the next micro-batch to be unscaled by again.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if self._hook_handles and (found_inf is not None or grad_scale is not None):
            raise RuntimeError(
                "fold_in_backward=True cannot take GradScaler: its scaled gradients were folded "
                "inside backward, before GradScaler could unscale them or find an inf. This "
                "micro-batch's scaled gradients are now in the optimizer's state; nothing else "
                "changed, and a plain step() completes the micro-step. To train on: restore the "
                "optimizer from a checkpoint taken before this micro-batch (or build a new one), "
                "then use bf16 autocast (torch.autocast(device_type, dtype=torch.bfloat16)), "
                "which needs no GradScaler, or fold_in_backward=False, which handles GradScaler")
        self._check_lr_in_window()
        grads, addresses = zip(*[self._group_grads(i, group)
                                 for i, group in enumerate(self.param_groups)]) or ((), ())
        if self._hooked:
            self._refuse_hooked_gradients(grads, addresses)
        on_triton = [self._runs_triton(i, group) for i, group in enumerate(self.param_groups)]
        if any(on_triton):
            self._check_triton_accum_steps()
        if not all(on_triton):
            self._sync_window()
            for index, runs in enumerate(on_triton):
                if not runs:
                    self._retire_device_windows(index)
        if found_inf is not None and all(on_triton) and not self._clips() and \
                self._averager is None:
            # The kernels skip on found_inf and count the window on the device: no sync. The
            # device takes accum_steps from the groups when its window starts. (A clipped or
            # averaged window must know its update step on the host: found_inf is read below.)
            accum_steps = self._read_accum_steps()
            for index, group in enumerate(self.param_groups):
                self._triton_micro_step(index, group, grads[index], accum_steps, grad_scale,
                                        found_inf, addresses=addresses[index])
            self._window_known = False
            self._end_micro_step()
            return loss
        if found_inf is not None and found_inf.item() != 0:
            self._updated = False
            self._end_micro_step()
            return loss
        if self._step_per_window():
            if not (self._window_open or self._hooked or any(
                    g is not None for group_grads in grads for g in group_grads)):
                self._updated = False  # no backward since the last step(): nothing to end
                return loss
        accum_steps = self._accum_steps_now()
        last = self._micro_step + 1 == accum_steps
        launch_k = accum_steps
        if self._step_per_window():
            self._check_window_length(last, accum_steps)
        if self._step_per_window() and not last:
            # The framework ends a short window (an epoch's last): what hooks folded this
            # micro-step is folded, not moved; the device is told the window ends here.
            self._move_in_torch_now(on_triton)
            launch_k = self._end_short_window(on_triton)
            last = True
        # With a process group or clipping the last micro-step only folds: the move follows
        # the average and the clip.
        move = self._averager is None and not self._clips()
        for index, (group, group_grads) in enumerate(zip(self.param_groups, grads)):
            if on_triton[index]:
                self._triton_micro_step(index, group, group_grads, launch_k, grad_scale, None,
                                        fold_only=last and not move, addresses=addresses[index])
            else:
                self._fold_group(group, group["params"], group_grads, accum_steps, last,
                                 None if grad_scale is None else float(grad_scale), move=move)
        if last and not move:
            self._finish_window(accum_steps, on_triton, launch_k)
        self._micro_step = 0 if last else self._micro_step + 1
        self._window_open = not last
        self._num_updates += last
        self._updated = last
        self._end_micro_step()
        return loss

    def _refuse_hooked_gradients(self, grads, addresses):
        """A .grad on a parameter whose hook has folded its gradient in this micro-step is a
        second gradient for it (see _SECOND_GRADIENT): refused before anything changes."""
        for group, group_grads, group_addresses in zip(self.param_groups, grads, addresses):
            if group_addresses is NO_GRADS:
                continue
            for p, g in zip(group["params"], group_grads):
                if g is not None and self._was_hooked(p):
                    raise RuntimeError(
                        f"step(): a parameter of shape {tuple(p.shape)} holds a .grad, but its "
                        f"fold_in_backward hook has folded its gradient in this micro-step "
                        f"already: fold_in_backward=True folds one gradient per parameter per "
                        f"micro-step. Nothing was changed; opt.zero_grad() drops the .grad, "
                        f"and step() then completes the micro-step")

    def _was_hooked(self, param):
        """Whether a hook of ``param`` has folded (or is holding) its gradient in this
        micro-step: the full path records it in ``_hooked``; the short way, which needs a full
        one in its bucket first (so ``_hooked`` is not empty), marks the bucket's row."""
        if id(param) in self._hooked:
            return True
        route = self._hook_routes.get(id(param))
        return route is not None and route.take is not None and \
            route.take.__self__.took(route.t)

    def _hooked_params(self):
        """The parameters hooks have taken the gradients of in this micro-step."""
        hooked = list(self._hooked.values())
        if hooked:     # (the short way follows a full path in its micro-step)
            known = set(self._hooked)
            hooked += [p for window in self._device_windows.values() if window.hooks_checked
                       for t, p in enumerate(window.params)
                       if window.row[t] is not None and id(p) not in known]
        return hooked

    def _end_micro_step(self):
        self._hooked.clear()
        self._micro_step_cache.clear()
        self._hyper_read.clear()
        self._backward_tasks = {}
        self._backward_ended = False
        for window in self._device_windows.values():
            window.end_micro_step()

    # ----- step_per_window: the framework calls step() once per window ----------------------

    def _step_per_window(self):
        return self.param_groups[0]["step_per_window"]

    def _reduction(self, group):
        """How the math weights a micro-batch: with step_per_window the framework has divided
        each loss already, so the gradients are added as they come ("sum")."""
        return "sum" if group["step_per_window"] else group["accum_reduction"]

    def _enter_backward(self, param):
        """step_per_window, a hook's first word: whether this gradient opens a new backward
        pass (then the previous one's micro-step is completed, as step() completes one in
        per-micro-batch mode) or belongs to the running one.

        A backward's hooks run in its autograd graph task or, under reentrant activation
        checkpointing, in nested tasks started inside it (newer ids). Every task a hook runs
        in gets a callback at its end; once all have ended the backward is over. A hook in a
        task no newer than those seen belongs to the running backward (an outer task still
        running: the end seen was a nested one's); a parameter hooked again in a newer task
        means a new backward even where no end was seen."""
        task = torch._C._current_graph_task_id()
        if self._backward_ended:
            if task <= self._backward_max_task:
                self._backward_ended = False
            else:
                self._complete_backward()
        elif id(param) in self._hooked and task > self._backward_max_task:
            self._complete_backward()
        if task not in self._backward_tasks:
            self._backward_tasks[task] = False
            self._backward_max_task = max(self._backward_max_task, task)
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(_backward_task_ended, weakref.ref(self), task))

    def _complete_backward(self):
        """Count the finished backward as a micro-step: step()'s bookkeeping for a micro-step
        that is not the window's last (the Triton path folds what hooks stashed)."""
        accum_steps = self._accum_steps_now()
        if self._micro_step + 1 >= accum_steps:
            raise RuntimeError(
                f"step_per_window=True: backward pass {self._micro_step + 2} of a window of "
                f"accum_steps={accum_steps} began before step(); set accum_steps to the "
                f"framework's gradient accumulation steps, and call step() once per window")
        for index, group in enumerate(self.param_groups):
            if self._runs_triton(index, group):
                self._triton_micro_step(index, group, [None] * len(group["params"]),
                                        accum_steps, None, None)
        self._micro_step += 1
        self._end_micro_step()

    def _check_window_length(self, full, accum_steps):
        """Warn once when the framework ends two windows in a row after the same number of
        backward passes, fewer than accum_steps: its accumulation is not accum_steps (an
        epoch's last window is short once)."""
        length = None if full else self._micro_step + 1
        if length is not None and length == self._short_window and not self._short_warned:
            self._short_warned = True
            warnings.warn(
                f"step_per_window: step() ended two windows in a row after {length} backward "
                f"passes, but accum_steps={accum_steps}; set accum_steps to the framework's "
                f"gradient accumulation steps (mean_of_squares weighs each backward by it)",
                UserWarning, stacklevel=4)
        self._short_window = length

    def _move_in_torch_now(self, on_triton):
        """A short window ends on Triton groups whose move runs on the torch path: their
        device folds so far (stashed gradients folded first) go back to the host state, and the
        torch path moves them."""
        moving = [index for index, runs in enumerate(on_triton)
                  if runs and self._variant(self.param_groups[index]).move_in_torch]
        if moving:
            self._flush_stashes()
        for index in moving:
            self._retire_device_windows(index)
            on_triton[index] = False
            self._micro_step_cache[("runs_triton", index)] = False

    def _end_short_window(self, on_triton):
        """Make the current micro-step the window's last on the Triton path: stashed
        gradients folded, hook folds marked folded-not-moved, the device's window length set
        to where it is now, so that step()'s launch moves every folded tensor."""
        length = self._micro_step + 1
        if not any(on_triton):
            return length
        self._flush_stashes()
        for (index, *_), window in self._device_windows.items():
            if on_triton[index]:
                window.mark_folded([t for t, g in enumerate(window.row)
                                    if isinstance(g, int) and g == HOOKED], FOLDED)
                window.set_window_length(length)
        # The host's mirror of the window length too: a window rebuilt before step()'s move (a
        # process group's first flat state) starts from it.
        self._window_accum_steps = length
        return length  # the launch's accum_steps: the window length where it starts now

    def _fold_in_backward(self, param):
        """The fold_in_backward hook: fold ``param``'s finished gradient (moving the parameter
        if this is the window's last micro-step) and free it. Called once per parameter per
        backward (the hook tries the short way first: see backward_hooks._fold_hook)."""
        grad = param.grad
        index = self._group_index.get(param)
        if grad is None or index is None or not self.param_groups[index]["fold_in_backward"]:
            return
        group = self.param_groups[index]
        if grad.is_sparse:
            raise RuntimeError(self._sparse_message(f"a parameter of param group {index}"))
        if self._distributed_check is None:
            self._distributed_check = _ddp_wrapping(self._all_params())
        if self._distributed_check:
            raise RuntimeError(self._distributed_check)
        if group["step_per_window"]:
            try:
                self._enter_backward(param)
            except RuntimeError:
                param.grad = None     # a backward beyond accum_steps: its first gradient, unfolded
                raise
        if self._was_hooked(param):
            param.grad = None         # unfolded: step() completes the micro-step without it
            raise RuntimeError(_SECOND_GRADIENT)
        self._sync_window()
        accum_steps = self._accum_steps_now()
        last = self._micro_step + 1 == accum_steps
        if torch.is_grad_enabled():      # autograd runs hooks with grad mode off, unless
            with torch.no_grad():        # create_graph=True
                self._hook_fold(index, group, param, grad, accum_steps, last)
        else:
            self._hook_fold(index, group, param, grad, accum_steps, last)
        param.grad = None
        self._hooked[id(param)] = param

    def _hook_fold(self, index, group, param, grad, accum_steps, last):
        """The fold of one hook, under no_grad."""
        if self._runs_triton(index, group):
            self._check_triton_accum_steps()
            self._triton_fold_in_backward(index, group, param, grad, accum_steps,
                                          fold_only=last and (self._clips() or
                                                              self._averager is not None))
        else:
            self._retire_device_windows(index)
            if (self._averager is not None or self._clips()) and last:
                # Fold only: the move follows the window's average and clipping. With a
                # process group the parameter's bucket goes out as soon as all of it is
                # folded.
                self._fold_group(group, [param], [grad], accum_steps, last, None, move=False)
                if self._averager is not None:
                    self._averager.ready(param, self._window_state_of, accum_steps,
                                         self._num_updates)
            else:
                self._fold_group(group, [param], [grad], accum_steps, last, None)

    def _finish_window(self, accum_steps, on_triton, launch_k):
        """The update step after a fold-only last micro-step. With a process group every
        parameter takes part, so one this rank never folded this window gets a zero-gradient
        fold (its moments decay as on the others) and the window state is averaged across
        ranks; with max_grad_norm the window gradient is clipped; then every parameter moves."""
        if self._averager is not None:
            for index, group in enumerate(self.param_groups):
                if on_triton[index]:
                    self._triton_fold_zeros(index, group, launch_k)
                    continue
                unfolded = [p for p in group["params"] if not self._folds(p)]
                self._fold_group(group, unfolded, [torch.zeros_like(p) for p in unfolded],
                                 accum_steps, True, None, move=False)
            self._flatten_window_state(on_triton)
            self._averager.finish(self._all_params(), self._window_state_of, accum_steps,
                                  self._num_updates)
        if self._clips():
            self._clip_window(on_triton)
        for index, group in enumerate(self.param_groups):
            if on_triton[index]:
                self._triton_micro_step(index, group, [None] * len(group["params"]), launch_k,
                                        None, None)
            else:
                self._fold_group(group, group["params"], [None] * len(group["params"]),
                                 accum_steps, True, None)

    def _triton_fold_zeros(self, index, group, accum_steps):
        """With a process group every parameter takes part in every window: on the Triton path
        a tensor no micro-step folded this window gets a fold of zeros (its moments decay as on
        the ranks that did fold it), fold-only, marked folded for the move. One sync reads the
        device's fold counts (the all-reduce that follows syncs anyway)."""
        for window in self._windows_of(index):
            folds = window.folds.tolist()
            unfolded = [t for t, f in enumerate(folds)
                        if f == 0 and not (isinstance(window.row[t], int) and window.row[t])]
            if not unfolded:
                continue
            row = [None] * len(window.params)
            for t in unfolded:
                row[t] = torch.zeros_like(_tables().local_tensor(window.params[t]))
            self._triton_launch(group, window, row, accum_steps, None, None, flush=True,
                                fold_only=True)
            window.mark_folded(unfolded, FOLDED)

    def _flatten_window_state(self, on_triton):
        """Keep every bucket's window state in one flat tensor per bucket, the state tensors
        views of it, so that the all-reduce runs in place on it (no copies): built on the first
        averaged window and whenever a state tensor was replaced (a load, a rebuilt state); the
        Triton groups whose tensors moved get their device tables rebuilt at once (from the
        counters they wrote back), for the clip and the move that follow."""
        moved = self._averager.bind_flat(self._window_state_keys(), self.state)
        for index in sorted({self._group_index[p] for p in moved}):
            self._retire_device_windows(index)
            if on_triton[index]:
                group = self.param_groups[index]
                for device, dtype in self._triton_plan(index, group).buckets:
                    self._device_window(index, group, device, dtype)

    def _window_state_keys(self):
        """Per parameter, the state keys that hold its window (what ranks average)."""
        return {p: self._variant(group).averaged for group in self.param_groups
                for p in group["params"]}

    # ----- window clipping ----------------------------------------------------------------------

    def _clips(self):
        return self.param_groups[0].get("max_grad_norm") is not None

    def _clip_window(self, on_triton):
        """Clip the window gradient Ḡ (the exact variants' accumulators) by its total 2-norm
        over every parameter, as torch.nn.utils.clip_grad_norm_ clips standard accumulation's
        .grad: coefficient min(1, max_norm / (norm + 1e-6)), on the device, no host sync.
        ``grad_norm`` keeps the norm before clipping."""
        max_norm = float(self.param_groups[0]["max_grad_norm"])
        accumulators, norms = [], []
        for index, group in enumerate(self.param_groups):
            if on_triton[index]:
                for window in self._windows_of(index):
                    accs = list(window.slots[0])
                    marked = torch.tensor([isinstance(g, int) and g == FOLDED
                                           for g in window.row])
                    # Only tensors folded this window hold Ḡ; the others hold a stale window.
                    held = (window.folds > 0) | marked.to(window.device, non_blocking=True)
                    tensor_norms = torch.stack(torch._foreach_norm(accs))
                    if isinstance(tensor_norms, DTensor):
                        # FSDP2 shards: the norm over every shard (a collective, as in
                        # clip_grad_norm_), then the kernels' local shards are clipped.
                        from .kernels.tables import local_tensor
                        tensor_norms = tensor_norms.full_tensor()
                        accs = [local_tensor(a) for a in accs]
                    norms.append(tensor_norms * held)
                    accumulators += accs
            else:
                accs = [as_real(self.state[p]["grad_accum"]) for p in group["params"]
                        if self._folds(p)]
                if accs:
                    norms.append(torch.stack(torch._foreach_norm(accs)))
                    accumulators += accs
        if not accumulators:
            self.grad_norm = torch.tensor(0.0)
            return
        first = norms[0].device
        total = torch.linalg.vector_norm(torch.cat([n.to(first) for n in norms]))
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device = {}
        for acc in accumulators:
            by_device.setdefault(acc.device, []).append(acc)
        for device, accs in by_device.items():
            torch._foreach_mul_(accs, coefficient.to(device))
        self.grad_norm = total

    def _window_state_of(self, param):
        group = self.param_groups[self._group_index[param]]
        return self._window_state(group, self.state[param])

    def _folds(self, param):
        state = self.state.get(param)
        return 0 if state is None else state.get("window_folds", 0)

    def _fold_group(self, group, group_params, grads, accum_steps, last, grad_scale, move=True):
        """Plan one micro-step of some of a group's parameters (all of them in step(), one in a
        hook): which fold, which fold first in this window, which move (none without ``move``);
        run it; then advance each parameter's fold count."""
        moves = last and move
        if self._averager is not None and group["accum_reduction"] == "sum" and \
                not group["step_per_window"]:
            # Ranks average their windows, so each folds R times its share of the window sum.
            # (With step_per_window each rank's window is what its .grad would hold, and the
            # average across ranks is DDP's, whose loss scaling the frameworks already match.)
            grad_scale = (1.0 if grad_scale is None else grad_scale) / self._averager.world_size
        params, states, planned_grads, first = [], [], [], []
        state_of = self.state
        for param, grad in zip(group_params, grads):
            state = state_of.get(param)
            folds = 0 if state is None else state.get("window_folds", 0)
            # A parameter with no gradient now still moves on the last micro-step if it got
            # gradients earlier in the window; one with none in the whole window stays put.
            if grad is None and not (moves and folds):
                continue
            params.append(param)
            states.append(state_of[param] if state is None else state)
            planned_grads.append(grad)
            first.append(folds == 0)
        if not params:
            return
        for param, state in zip(params, states):
            self._init_state(group, param, state)
        self._run_micro_step(group, params, states, planned_grads, first, [moves] * len(params),
                             accum_steps, grad_scale)
        for state in states:
            state["window_folds"] = 0 if moves else state["window_folds"] + 1

    def _group_grads(self, index, group):
        """The group's gradients (refusing a sparse one) and, when every one is a tensor with
        storage, their data_ptr(), which the Triton path's gradient row reuses; NO_GRADS where
        every one is None; else None."""
        grads = [p.grad for p in group["params"]]
        if _all_none(grads):
            return grads, NO_GRADS    # fold_in_backward: every hook has taken its gradient
        try:
            return grads, list(map(_data_ptr, grads))
        except (TypeError, RuntimeError):   # a None, or a tensor without storage (sparse)
            pass
        for i, grad in enumerate(grads):
            if grad is not None and grad.is_sparse:
                raise RuntimeError(self._sparse_message(f"param {i} of param group {index}"))
        return grads, None

    def _sparse_message(self, where):
        return (f"{type(self).__name__} does not support sparse gradients ({where} has one, "
                f"e.g. from nn.Embedding(sparse=True)): accumopt folds every micro-batch into "
                f"dense optimizer state, so a sparse gradient would save nothing. Use "
                f"sparse=False, or give the sparse parameters an optimizer of their own "
                f"(torch.optim.SparseAdam, or torch.optim.SGD with .grad accumulation)")

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

    def _use_foreach(self, group, params):
        """The multi-tensor form where torch has native foreach kernels, as torch.optim does,
        unless the group's ``foreach`` says otherwise."""
        if group.get("foreach") is not None:
            return group["foreach"]
        return all(p.is_cuda for p in params)

    # ----- the Triton path --------------------------------------------------------------------

    def _runs_triton(self, index, group):
        """Whether a group's micro-step runs the Triton kernels: backend "triton" (or
        fused=True), or "auto" with CUDA tensors and Triton installed; and every parameter one
        the kernels take (anything else, e.g. a non-contiguous or complex parameter, runs the
        torch path). Worked out once per micro-step, from the group's plan."""
        key = ("runs_triton", index)
        if key not in self._micro_step_cache:
            runs = self._triton_plan(index, group).takes
            if runs and self._variant(group).move_in_torch:
                # The kernels fold; the window's last micro-step, which moves, is the torch
                # path's (the host knows where the window is, after one sync at most).
                self._sync_window()
                k = self._window_accum_steps if self._window_open else self._read_accum_steps()
                runs = self._micro_step + 1 != k
            self._micro_step_cache[key] = runs
        return self._micro_step_cache[key]

    def _triton_plan(self, index, group):
        """A group's Triton layout, kept across micro-steps while its parameters keep their
        storage (one data_ptr() per parameter checks it): whether the kernels take the group,
        its buckets ((device, dtype) -> positions in the group) and whether it holds DTensors.
        A parameter whose storage is replaced (``p.data = ...``) gets a new plan."""
        plan = self._micro_step_cache.get(("plan", index))
        if plan is not None:
            return plan      # checked once per micro-step (hooks call this once per parameter)
        params = group["params"]
        fingerprint = list(map(_data_ptr, params))
        plan = self._plans.get(index)
        if plan is not None and plan.params is params and plan.fingerprint == fingerprint:
            self._micro_step_cache[("plan", index)] = plan
            return plan
        buckets = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        plan = _TritonPlan(params, fingerprint, self._kernels_take(group), buckets,
                           any(isinstance(p, DTensor) for p in params))
        self._plans[index] = self._micro_step_cache[("plan", index)] = plan
        return plan

    def _kernels_take(self, group):
        params = group["params"]
        backend = self._backend_of(group)
        if backend == "torch" or not params:
            return False
        if self._averager is not None and group["accum_reduction"] == "sum" and \
                not group["step_per_window"]:
            return False     # each rank folds R times its share: the torch path's scaling
        if backend == "auto" and not (all(p.is_cuda for p in params)
                                      and triton_can_run(params)):
            return False
        if self._variant(group).kernel is None:
            return False
        from .kernels import kernel_can_take
        return all(kernel_can_take(p) for p in params)

    def _check_triton_accum_steps(self):
        """The device counts the window in int32: refuse a larger accum_steps before anything
        runs (checked once per micro-step: the hooks and step() all ask)."""
        if "accum_steps checked" in self._micro_step_cache:
            return
        for group in self.param_groups:
            if isinstance(group["accum_steps"], numbers.Integral) and \
                    group["accum_steps"] > _INT32_MAX:
                raise ValueError(f"Invalid accum_steps: {group['accum_steps']} (the Triton path "
                                 f"counts windows in int32: at most {_INT32_MAX}; use "
                                 f"backend='torch' for longer windows)")
        self._micro_step_cache["accum_steps checked"] = True

    def _triton_micro_step(self, index, group, grads, accum_steps, grad_scale, found_inf,
                           fold_only=False, addresses=None):
        """One micro-step of a Triton group: per bucket, a launch over the gradients not yet
        folded (in fold_in_backward mode, those hooks stashed) and the window's bookkeeping.
        ``fold_only`` (the last micro-step of a clipped window): fold without moving or
        counting, and mark the tensors folded-not-moved for the launch that follows the clip.
        ``addresses``: the gradients' data_ptr(), or NO_GRADS (see _group_grads), or None."""
        none = addresses is NO_GRADS
        if none:
            addresses = None
        plan = self._triton_plan(index, group)
        params = group["params"]
        single = len(plan.buckets) == 1
        for (device, dtype), positions in plan.buckets.items():
            window = self._device_window(index, group, device, dtype)
            window.launch_held()      # large gradients hooks held: folded as they would have been
            bucket_grads = grads if single else [grads[i] for i in positions]
            if plan.dtensor:
                bucket_grads = [_shard_like(g, params[i]) for g, i in zip(bucket_grads, positions)]
            row = bucket_grads
            if window.has_marks:      # stashed by hooks, or folded for an export or a clip
                if none or _all_none(bucket_grads):
                    row = window.row          # fold_in_backward: every gradient was hooked
                else:
                    row = [g if g is not None else held
                           for g, held in zip(bucket_grads, window.row)]
            if not fold_only:
                self._triton_launch(group, window, row, accum_steps, grad_scale, found_inf,
                                    addresses=addresses if single else None)
                continue
            row = [g if torch.is_tensor(g) else None for g in row]
            self._triton_launch(group, window, row, accum_steps, grad_scale, None, flush=True,
                                fold_only=True)
            window.flushed([t for t, g in enumerate(row) if g is not None], FOLDED)

    def _triton_fold_in_backward(self, index, group, param, grad, accum_steps, fold_only=False):
        """A hook's fold on the Triton path, the first one of its tensor in a micro-step: find
        its bucket's window (checked once per micro-step), keep the route for later
        micro-steps, fold. Where the hook launches of this micro-step take the arguments of an
        earlier micro-step's (the same hyperparameters, window length and fold_only), the tensor
        takes the short way at once."""
        # read now: a stashed gradient's move in step() keeps them
        hyper = self._hyper_values(group)
        window = self._device_window(index, group, param.device, param.dtype)
        t = window.index[param]
        key = None
        if not (group["step_per_window"] or window.dtensor):
            # This micro-step's later hooks of the bucket, and later micro-steps, fold this
            # tensor from the hook's first lines (step_per_window must see every hook: it counts
            # the backward passes; a DTensor's gradient may need resharding first).
            route = self._hook_routes.get(id(param))
            if route is not None:
                route.take, route.t = window.take_hooked, t
            window.hooks_checked = True
            window.hook_mark = FOLDED if fold_only else HOOKED
            # What the hook launch arguments are built from, beside the window's own tensors.
            key = (self._variant(group), tuple(hyper.items()), accum_steps,
                   self._reduction(group), fold_only)
            if window.reuse_hook_arguments(key) and window.take_hooked(t, param):
                return
        self._fold_into_window(group, window, t, param, grad, accum_steps, fold_only)
        if key is not None:
            window.keep_hook_arguments(key)

    def _fold_into_window(self, group, window, t, param, grad, accum_steps, fold_only):
        """Tensor ``t``'s gradient into its window: a large one gets its own launch now (after the
        ones the short way holds), and its arguments serve the later ones; a small one waits in
        the bucket's stash for step() (or a flush once the stash is large).
        ``fold_only``: the window's last micro-step with clipping or a process group, whose
        moves wait for the norm or the average."""
        if window.plan.dtensor:
            grad = _shard_like(grad, param)
        tables = _tables()
        if window.numel_of[t] >= tables.HOOK_LAUNCH_MIN_NUMEL:
            window.launch_held()      # (the short way's held gradients go first)
            self._triton_launch(group, window, grad, accum_steps, None, None, hook_tensor=t,
                                fold_only=fold_only)
            window.mark_folded([t], FOLDED if fold_only else HOOKED)
            return
        window.stash(t, grad)
        if window.stashed_numel >= tables.STASH_MAX_NUMEL:
            self._flush_stash(group, window, accum_steps, fold_only=fold_only)

    def _flush_stash(self, group, window, accum_steps, fold_only=False):
        stashed = window.stashed()
        self._triton_launch(group, window, stashed, accum_steps, None, None, flush=True,
                            fold_only=fold_only)
        window.flushed([t for t, g in enumerate(stashed) if g is not None],
                       FOLDED if fold_only else HOOKED)

    def _flush_stashes(self):
        """Fold every gradient a hook stashed for step() now, without moving any parameter
        (before a state_dict or copy, which must leave the parameters as they are)."""
        for (index, *_), window in self._device_windows.items():
            if window.stashed_numel or any(torch.is_tensor(g) for g in window.row):
                self._flush_stash(self.param_groups[index], window, self._window_accum_steps,
                                  fold_only=True)

    def _windows_of(self, index):
        """The live DeviceWindows of param group ``index`` (a list: callers may retire them)."""
        return [window for key, window in self._device_windows.items() if key[0] == index]

    def _device_window(self, index, group, device, dtype):
        """The DeviceWindow of a bucket. The group's windows are checked together, once per
        plan of the group: those whose tensors and state are unchanged are kept; if one changed,
        every window of the group writes its counters back into the host state and is retired
        (a tensor may have moved between buckets, and its counters must come along), so no fold
        is lost when, e.g., a parameter's storage is replaced mid-window. A bucket without a
        window gets one, built from the host state."""
        key = (index, device, dtype)
        window = self._device_windows.get(key)
        plan = self._triton_plan(index, group)
        if window is not None and window.plan is plan:
            return window
        checked = [(k, w) for k, w in self._device_windows.items() if k[0] == index]
        if any(w.plan is not plan for _, w in checked):
            if all(self._window_matches(group, plan, w, device_of, dtype_of)
                   for (_, device_of, dtype_of), w in checked):
                for _, w in checked:
                    w.plan = plan
            else:
                self._retire_device_windows(index)
            window = self._device_windows.get(key)
            if window is not None:
                return window
        params, states, slots = self._bucket_tables(group, plan, device, dtype)
        window = self._build_device_window(group, params, states, slots)
        window.plan = plan
        self._device_windows[key] = window
        return window

    def _window_matches(self, group, plan, window, device, dtype):
        """Whether ``window`` still addresses its bucket's tensors and state under ``plan``."""
        params, _, slots = self._bucket_tables(group, plan, device, dtype)
        return window.matches(params, slots)

    def _bucket_tables(self, group, plan, device, dtype):
        """A bucket's parameters under ``plan``, their (initialised) states and their state
        tensors in slot order: what its DeviceWindow is built from (nothing for a bucket the
        plan no longer has)."""
        params = [group["params"][i] for i in plan.buckets.get((device, dtype), ())]
        states = [self.state[p] for p in params]
        for p, s in zip(params, states):
            self._init_state(group, p, s)
        slots = list(zip(*[self._variant(group).device_slots(s) for s in states]))
        return params, states, slots

    def _build_device_window(self, group, params, states, slots):
        from .kernels import DeviceWindow
        self._sync_window()
        folds = [state["window_folds"] for state in states]
        updates = [self._variant(group).initial_updates(state) for state in states]
        window = DeviceWindow(params, slots, folds, updates,
                              (self._micro_step, self._window_accum_steps or 0,
                               int(self._updated), self._num_updates))
        self._variant(group).tie_to_window(window, states)
        return window

    def _window_counters(self, key, window):
        """Per tensor of a DeviceWindow, the host state its counters stand for (a sync),
        counting a micro-step that hooks have folded but step() has not yet completed as
        step mode's hooks do: folded, and on the window's last micro-step moved."""
        group = self.param_groups[key[0]]
        folds, updates = window.counters()
        last = self._window_open and self._micro_step + 1 == self._window_accum_steps
        out = {}
        for t, param in enumerate(window.params):
            f, u = folds[t], updates[t]
            mark = window.row[t]
            if isinstance(mark, int) and mark == HOOKED:
                f, u = (0, u + 1) if last else (f + 1, u)
            elif isinstance(mark, int) and mark == FOLDED:
                f += 1
            out[param] = {"window_folds": int(f), **self._variant(group).state_of_updates(u)}
        return out

    def _device_state(self):
        """The host state every live DeviceWindow's counters stand for, per parameter."""
        out = {}
        for key, window in self._device_windows.items():
            out.update(self._window_counters(key, window))
        return out

    def _retire_device_windows(self, index):
        """Write a group's device counters back into its host state and drop its windows (the
        torch path, or a rebuilt window, then starts from the host state)."""
        keys = [key for key in self._device_windows if key[0] == index]
        if not keys:
            return
        self._sync_window()
        for key in keys:
            window = self._device_windows[key]
            for param, entry in self._window_counters(key, window).items():
                self.state[param].update(entry)
            window.retire()            # hook routes to it are stale
            del self._device_windows[key]

    # ----- state_dict ---------------------------------------------------------------------------

    @torch._disable_dynamo
    def state_dict(self):
        """torch.optim's state_dict plus the window position under ``"accum"``. Every parameter
        with state has all of its variant's keys; Triton-path counters are written in (a sync).
        State-dict hooks see the whole of it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_window()
        self._flush_stashes()
        overrides = self._device_state()
        mapping, param_groups, start = {}, [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            mapping.update({id(p): i for i, p in enumerate(group["params"], start)
                            if id(p) not in mapping})
            packed["params"] = [mapping[id(p)] for p in group["params"]]
            start += len(packed["params"])
            param_groups.append(packed)
        for packed in param_groups:
            packed[WINDOW_KEY] = self._position()
        state = {}
        for param, entry in self.state.items():
            if not isinstance(param, torch.Tensor):
                state[param] = entry
                continue
            if entry:
                self._init_state(self.param_groups[self._group_index[param]], param, entry)
            state[mapping[id(param)]] = {**entry, **overrides.get(param, {})}
        state_dict = {"state": state, "param_groups": param_groups, "accum": self._position()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict):
        """Load an accumopt state_dict (at any micro-step) or a torch.optim one (a window
        boundary). Every value is checked as the constructor checks it before anything changes;
        hyperparameters a torch.optim state_dict lacks keep their current values, and the
        runtime options (backend, fold_in_backward, fused, foreach, ...) always do."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        position, groups, state = self._prepare_load(state_dict)
        self.param_groups = groups
        self.state = state
        self._init_transient()
        self._set_position(position)
        if self._averager is not None:
            self._averager.set_params(self._all_params())
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _prepare_load(self, state_dict):
        """Validate ``state_dict`` and build what load_state_dict installs; raise ValueError
        (naming what is wrong) before anything changes."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"Invalid state_dict: {type(state_dict).__name__} (must be a dict)")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"Invalid state_dict: it has no {key!r} entry")
        # torch.distributed.checkpoint keeps only "state" and "param_groups": the window
        # position travels in every saved param group too.
        position = state_dict.get("accum")
        if position is None and state_dict.get("param_groups"):
            first = state_dict["param_groups"][0]
            position = first.get(WINDOW_KEY) if isinstance(first, dict) else None
        position = _check_position(position)
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(
                self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"Invalid state_dict: param group {index} is not a dict "
                                 f"with 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            new = {**{key: group[key] for key in self.defaults}, **saved}
            new.update({key: group[key] for key in RUNTIME_OPTIONS if key in group})
            new.update(self._fixed_options)
            new.pop(WINDOW_KEY, None)
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new["param_names"] = group["param_names"]
            try:
                check_window_args(new)
                self._check_group(new)
            except ValueError as error:
                raise ValueError(f"{error} in param group {index} of the state_dict") from None
            groups.append(new)
        reads = position["hyper_read"]
        if reads is not None:
            if len(reads) != len(groups):
                raise ValueError(f"Invalid hyper_read (state_dict 'accum'): {len(reads)} "
                                 f"entries for {len(groups)} param groups")
            for index, (group, values) in enumerate(zip(groups, reads)):
                if values is not None and set(values) != set(self._hyper(group)):
                    raise ValueError(f"Invalid hyper_read (state_dict 'accum'): param group "
                                     f"{index} has {sorted(values)}, not this optimizer's "
                                     f"{sorted(self._hyper(group))}")
        if position["micro_step"] or position["window_accum_steps"] is not None:
            values = {g["accum_steps"] for g in groups}
            if len(values) != 1:
                raise ValueError(f"Invalid accum_steps: {sorted(values)} differ between the "
                                 f"state_dict's param groups")
        id_map = {}
        for saved, group in zip(saved_groups, groups):
            for saved_id, param in zip(saved["params"], group["params"]):
                id_map[saved_id] = (param, saved, group)
        state = defaultdict(dict)
        if not isinstance(state_dict["state"], dict):
            raise ValueError("Invalid state_dict: its 'state' must be a dict")
        for key, value in state_dict["state"].items():
            if key not in id_map:
                state[key] = value
                continue
            param, saved, group = id_map[key]
            if not isinstance(value, dict):
                raise ValueError(f"Invalid state_dict: state {key!r} is not a dict")
            entry = {}
            for name, item in value.items():
                if isinstance(item, torch.Tensor):
                    item = Optimizer._process_value_according_to_param_policy(
                        param, item, key, state_dict["param_groups"], name)
                entry[name] = item
            if entry:
                try:
                    self._check_loaded_entry(group, param, entry, position)
                except ValueError as error:
                    raise ValueError(f"Invalid state_dict: state {key!r}: {error}") from None
            state[param] = entry
        return position, groups, state

    def _check_loaded_entry(self, group, param, entry, position):
        folds = entry.setdefault("window_folds", 0)
        check_nonnegative_int("window_folds", folds)
        # A state_dict taken between backward and step() in fold_in_backward mode already
        # holds the pending micro-step's fold.
        if folds > position["micro_step"] + 1:
            raise ValueError(f"window_folds {folds} exceeds the window's {position['micro_step']}"
                             f" micro-steps")
        self._check_state(group, param, entry)
        for name, item in entry.items():
            if isinstance(item, torch.Tensor) and name != "step" and item.dim() and \
                    item.shape != param.shape:
                raise ValueError(f"{name} has shape {tuple(item.shape)}, its parameter "
                                 f"{tuple(param.shape)}")


_SECOND_GRADIENT = (
    "fold_in_backward=True folds one gradient per parameter per micro-step, and this parameter's "
    "was folded already in this one (a second backward() before step()?). Its new gradient was "
    "dropped, unfolded (.grad is None); the gradients that backward gave before it to "
    "parameters the first backward did not reach were folded, as the parts of one micro-batch "
    "split over several backward calls are, and step() completes the micro-step with them. "
    "Call step() after each backward (or, for k backward passes per step(), use "
    "step_per_window=True)")


# _group_grads' addresses of a group whose gradients are all None (fold_in_backward: every hook
# took its gradient), so that later checks need not scan them again
NO_GRADS = ()


def _all_none(values):
    """Whether every one of ``values`` is None (C-level: no per-item Python, and no tensor is
    compared with ``==``)."""
    return not any(map(operator.is_not, values, itertools.repeat(None)))


def _lr_key(lr):
    """An lr to compare across micro-steps: its value (a CUDA Tensor lr by identity: no sync)."""
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" else id(lr)
    return lr


def _backward_task_ended(optimizer_ref, task):
    """The autograd engine's callback at the end of a graph task a step_per_window hook ran
    in: once every such task has ended, the backward pass is over."""
    optimizer = optimizer_ref()
    if optimizer is None or task not in optimizer._backward_tasks:
        return
    optimizer._backward_tasks[task] = True
    # A nested task (reentrant activation checkpointing) ends inside the backward that runs it:
    # its end is not the backward's. Where no hook runs in the outer task, the next backward's
    # first repeated parameter completes the micro-step instead.
    if all(optimizer._backward_tasks.values()) and _backward_depth() <= 1:
        optimizer._backward_ended = True


def _backward_depth():
    """How many autograd engine runs the Python stack is inside (2 or more: a nested one)."""
    depth, frame = 0, sys._getframe(1)
    while frame is not None:
        depth += frame.f_code.co_name == "_engine_run_backward"
        frame = frame.f_back
    return depth


def _ddp_wrapping(params):
    """The refusal message if a DistributedDataParallel module wraps any of ``params`` (its
    reducer all-reduces after the hooks have folded the local gradient), else "". One scan of
    the live objects, only where torch.distributed is initialized."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    from torch.nn.parallel import DistributedDataParallel
    ids = {id(p) for p in params}
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and any(
                id(p) in ids for p in obj.module.parameters()):
            return ("fold_in_backward=True cannot run under DistributedDataParallel: its "
                    "post-accumulate-grad hooks see each rank's local gradient before DDP "
                    "averages it, and freeing it makes DDP average zeros. Nothing was folded. "
                    "Drop the DDP wrapper and pass process_group=torch.distributed.group.WORLD "
                    "(accumopt averages the window across ranks, once per window), or use "
                    "fold_in_backward=False under DDP")
    return ""


def _check_position(position):
    """The ``"accum"`` entry of a state_dict (absent in torch.optim's: a window boundary)."""
    if position is None:
        return {"micro_step": 0, "window_accum_steps": None, "num_updates": 0, "updated": False,
                "backward_ended": False, "hyper_read": None}
    if not isinstance(position, dict):
        raise ValueError(f"Invalid state_dict: 'accum' is {type(position).__name__} (must be a "
                         f"dict)")
    missing = {"micro_step", "window_accum_steps", "num_updates"} - position.keys()
    if missing:
        raise ValueError(f"Invalid state_dict: 'accum' lacks {sorted(missing)}")
    micro_step, window_k = position["micro_step"], position["window_accum_steps"]
    check_nonnegative_int("micro_step (state_dict 'accum')", micro_step)
    check_nonnegative_int("num_updates (state_dict 'accum')", position["num_updates"])
    if window_k is not None:
        check_accum_steps(window_k)
    if micro_step:
        if window_k is None or not micro_step < window_k:
            raise ValueError(f"Invalid state_dict: micro_step {micro_step} is outside a window "
                             f"of {window_k}")
    flags = {}
    for name in ("updated", "backward_ended"):
        flags[name] = position.get(name, False)
        if not isinstance(flags[name], bool):
            raise ValueError(f"Invalid {name} (state_dict 'accum'): {flags[name]!r} (must be "
                             f"True or False)")
    if flags["backward_ended"] and window_k is None:
        raise ValueError("Invalid state_dict: backward_ended is True outside a window")
    reads = position.get("hyper_read")
    if reads is not None:
        if not isinstance(reads, (list, tuple)) or not all(
                values is None or (isinstance(values, dict) and all(map(_is_hyper_value,
                                                                        values.values())))
                for values in reads):
            raise ValueError(f"Invalid hyper_read (state_dict 'accum'): {reads!r} (must be a "
                             f"list of one dict of hyperparameter values, or None, per param "
                             f"group)")
        reads = [None if values is None else dict(values) for values in reads]
    return {"micro_step": micro_step, "window_accum_steps": window_k,
            "num_updates": position["num_updates"], **flags, "hyper_read": reads}


def _is_hyper_value(value):
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, numbers.Real) for v in value)
    return value is None or isinstance(value, (numbers.Real, str))


def _tables():
    """accumopt.kernels.tables, imported on first use (Triton is optional)."""
    global _TABLES
    if _TABLES is None:
        from .kernels import tables
        _TABLES = tables
    return _TABLES


_TABLES = None


class _TritonPlan:
    """A group's Triton layout while its parameters keep their storage (see _triton_plan)."""
    __slots__ = ("params", "fingerprint", "takes", "buckets", "dtensor")

    def __init__(self, params, fingerprint, takes, buckets, dtensor):
        self.params, self.fingerprint, self.takes = params, fingerprint, takes
        self.buckets, self.dtensor = buckets, dtensor


def _shard_like(grad, param):
    """A DTensor gradient laid out as its parameter (the Triton path folds local shards into
    local shards); FSDP2's reduce-scattered gradients already are."""
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and \
            (grad.placements != param.placements or grad.device_mesh != param.device_mesh):
        return grad.redistribute(param.device_mesh, param.placements)
    return grad


def param_tensors(params):
    """The tensors of a param group's ``params``, which may be torch's named form, ``(name,
    tensor)`` pairs (``model.named_parameters()``)."""
    return [p[1] if isinstance(p, tuple) else p for p in params]


def _same(tensor):
    return tensor


def as_real(tensor):
    """Complex tensors are folded as their real views, as torch.optim does."""
    if tensor is not None and torch.is_complex(tensor):
        return torch.view_as_real(tensor)
    return tensor
