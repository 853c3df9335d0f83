"""The window bookkeeping every accumopt optimizer shares.

A window is ``accum_steps`` good micro-batches. :class:`AccumOptimizer` counts them, decides per
parameter whether a micro-step is its first fold of the window (decay the moments) and whether
the window ends (move the parameter), takes GradScaler's scale and drop decision, and keeps all
of it in the state_dict. The subclasses only turn a planned micro-step into a call of their math.

On the torch path the per-parameter bookkeeping lives in the parameter's state: ``window_folds``
counts the micro-steps folded into it in the current window and is absent at a window boundary,
so the state at a boundary has exactly torch.optim's keys.

With ``fold_in_backward`` the micro-step's folds happen inside backward, one parameter at a time
as autograd finishes its gradient (:mod:`accumopt.backward_hooks`), with the same per-parameter
plan as step mode; ``step()`` then moves the parameters that got a gradient earlier in the window
but none now, and advances the window.

On the Triton path the same bookkeeping lives on the device, in one
:class:`accumopt.kernels.DeviceWindow` per bucket (a group's tensors of one device and dtype), so
that a GradScaler can drop a micro-batch without a host sync. The host keeps a mirror of the
window position while it can know it; after a step whose drop only the device knows, reading
``updated``, ``num_updates`` or ``micro_step`` syncs it back.
"""
import torch
from torch.optim import Optimizer

from .backend import check_backend, triton_can_run
from .backward_hooks import register_fold_hooks
from .validation import check_accum_steps, check_window_args


class AccumOptimizer(Optimizer):
    """Base class of the accumopt optimizers: one ``step()`` per micro-batch, a parameter
    update every ``accum_steps`` of them.

    Subclasses define ``_check_group(group)`` for their own hyperparameters,
    ``_run_micro_step(group, params, grads, first, update, accum_steps, grad_scale)``, which folds
    ``grads`` (None: update-only) into the state of ``params`` and moves those with ``update``,
    and for the Triton path ``_triton_slots(group, param, state)`` (allocate the state, return
    the variant's slot tensors), ``_triton_initial_updates(state)``,
    ``_triton_launch(group, window, grads, accum_steps, grad_scale, found_inf, **launch)``
    (``launch``: DeviceWindow.launch's ``hook_tensor`` / ``flush``) and
    ``_triton_export(group, entry, folds, updates)`` (shape a state_dict entry).
    """

    # step() unscales by GradScaler's grad_scale while folding and drops a micro-batch on its
    # found_inf, so GradScaler hands both over instead of unscaling and skipping itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, process_group=None):
        self._hook_handles = []           # fold_in_backward hooks, filled by add_param_group
        self._group_index = {}            # parameter -> index of its param group
        self._averager = None             # averages windows across ranks (process_group)
        if process_group is not None:
            from .distributed import WindowAverager
            self._averager = WindowAverager(process_group)
        super().__init__(params, defaults)
        self.process_group = process_group
        if self._averager is not None:
            self._averager.check_identical(self._all_params())
        self._micro_step = 0              # good micro-batches folded into the current window
        self._window_accum_steps = None   # the current window's k, read when the window opens
        self._window_open = False         # k read (by a hook or step) and the window not ended
        self._num_updates = 0             # windows completed: parameter updates so far
        self._updated = False             # whether the last step() moved the parameters
        self._window_known = True         # False after a step only the device knew the drop of
        self._device_windows = {}         # (group index, device, dtype) -> DeviceWindow
        self._hooked = set()              # parameters hooks folded in this micro-step
        self._micro_step_cache = {}       # per-micro-step answers the hooks reuse

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for key, value in (("_micro_step", 0), ("_window_accum_steps", None),
                           ("_window_open", False), ("_num_updates", 0), ("_updated", False),
                           ("process_group", None), ("_window_known", True),
                           ("_device_windows", {}), ("_hook_handles", []), ("_group_index", {}),
                           ("_hooked", set()), ("_micro_step_cache", {}), ("_averager", None)):
            self.__dict__.setdefault(key, value)

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
        """Good micro-batches folded into the current window so far (0 at a boundary)."""
        self._sync_window()
        return self._micro_step

    def _sync_window(self):
        """Read the window position back from the device after steps whose GradScaler drop
        decision only the device knew (one sync; none otherwise)."""
        if self._window_known:
            return
        window = next(iter(self._device_windows.values()))
        micro_step, window_k, updated, num_updates = window.position()
        self._micro_step, self._window_accum_steps = micro_step, window_k
        self._updated, self._num_updates = bool(updated), num_updates
        self._window_open = micro_step > 0
        self._window_known = True

    def _accum_steps_now(self):
        """The current window's accum_steps, read from the param groups when the window opens
        (at its first hook or step) and fixed until it ends."""
        if not self._window_open:
            self._window_accum_steps = self._read_accum_steps()
            self._window_open = True
        return self._window_accum_steps

    def add_param_group(self, param_group):
        filled = {**self.defaults, **param_group}
        check_window_args(filled)
        self._check_group(filled)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        check_backend(filled["backend"], params)
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        self._group_index.update((p, index) for p in self.param_groups[index]["params"])
        if filled["fold_in_backward"]:
            self._hook_handles += register_fold_hooks(self, self.param_groups[index]["params"])
        if self._averager is not None:
            self._averager.set_params(self._all_params())

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def remove_hooks(self):
        """Remove the fold_in_backward hooks: gradients then stay in ``.grad``, as without
        accumopt. Call before dropping an optimizer whose parameters live on."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _check_group(self, group):
        raise NotImplementedError

    def _run_micro_step(self, group, params, grads, first, update, accum_steps, grad_scale):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Fold this micro-batch's gradients (those hooks have not folded already); on every
        ``accum_steps``-th call, move the parameters. Sets ``updated`` and, on an update,
        increments ``num_updates``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [self._group_grads(i, group) for i, group in enumerate(self.param_groups)]
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if self._hook_handles and (found_inf is not None or grad_scale is not None):
            raise RuntimeError(
                "fold_in_backward=True cannot take GradScaler: the scaled gradients were folded "
                "inside backward, before GradScaler could find an inf in them. Train with bf16 "
                "autocast instead (torch.autocast(device_type, dtype=torch.bfloat16)), which "
                "needs no GradScaler, or use step mode (fold_in_backward=False).")
        on_triton = [self._runs_triton(i, group) for i, group in enumerate(self.param_groups)]
        if not all(on_triton):
            self._sync_window()
        if found_inf is not None and all(on_triton):
            # The kernels skip on found_inf and count the window on the device: no sync. The
            # device takes accum_steps from the groups when its window starts.
            accum_steps = self._read_accum_steps()
            for index, group in enumerate(self.param_groups):
                self._triton_micro_step(index, group, grads[index], accum_steps, grad_scale,
                                        found_inf)
            self._window_known = False
            self._end_micro_step()
            return loss
        if found_inf is not None and found_inf.item() != 0:
            self._updated = False
            self._end_micro_step()
            return loss
        accum_steps = self._accum_steps_now()
        last = self._micro_step + 1 == accum_steps
        # With a process group the last micro-step only folds: the move follows the average.
        move = self._averager is None
        for index, (group, group_grads) in enumerate(zip(self.param_groups, grads)):
            if on_triton[index]:
                self._triton_micro_step(index, group, group_grads, accum_steps, grad_scale, None)
            else:
                self._fold_group(group, group["params"], group_grads, accum_steps, last,
                                 None if grad_scale is None else float(grad_scale), move=move)
        if last and not move:
            self._average_and_move(accum_steps)
        self._micro_step = 0 if last else self._micro_step + 1
        self._window_open = not last
        self._num_updates += last
        self._updated = last
        self._end_micro_step()
        return loss

    def _end_micro_step(self):
        self._hooked.clear()
        self._micro_step_cache.clear()
        for window in self._device_windows.values():
            window.end_micro_step()

    @torch.no_grad()
    def _fold_in_backward(self, param):
        """The fold_in_backward hook: fold ``param``'s finished gradient (moving the parameter
        if this is the window's last micro-step) and free it."""
        grad = param.grad
        index = self._group_index.get(param)
        if grad is None or index is None or not self.param_groups[index]["fold_in_backward"]:
            return
        group = self.param_groups[index]
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               f"(a parameter of param group {index} has one)")
        if param in self._hooked:
            raise RuntimeError("fold_in_backward=True folds one gradient per parameter per "
                               "micro-step: call step() after each backward")
        self._sync_window()
        accum_steps = self._accum_steps_now()
        last = self._micro_step + 1 == accum_steps
        if self._runs_triton(index, group):
            self._triton_fold_in_backward(index, group, param, grad, accum_steps)
        elif self._averager is not None and last:
            # Fold only; the parameter's bucket goes out as soon as all of it is folded.
            self._fold_group(group, [param], [grad], accum_steps, last, None, move=False)
            self._averager.ready(param, self._window_state_of, accum_steps, self._num_updates)
        else:
            self._fold_group(group, [param], [grad], accum_steps, last, None)
        param.grad = None
        self._hooked.add(param)

    def _average_and_move(self, accum_steps):
        """The update step with a process group: every parameter takes part, so one this rank
        never folded this window gets a zero-gradient fold (its moments decay as on the others);
        then the window state is averaged across ranks and every parameter moves."""
        for group in self.param_groups:
            unfolded = [p for p in group["params"] if not self.state[p].get("window_folds", 0)]
            self._fold_group(group, unfolded, [torch.zeros_like(p) for p in unfolded],
                             accum_steps, True, None, move=False)
        self._averager.finish(self._all_params(), self._window_state_of, accum_steps,
                              self._num_updates)
        for group in self.param_groups:
            self._fold_group(group, group["params"], [None] * len(group["params"]), accum_steps,
                             True, None)

    def _window_state_of(self, param):
        group = self.param_groups[self._group_index[param]]
        return self._window_state(group, self.state[param])

    def _window_state(self, group, state):
        """The state tensors that hold a parameter's window: what ranks average."""
        raise NotImplementedError

    def _runs_triton(self, index, group):
        """Whether a group's micro-step runs the Triton kernels: backend "triton", or "auto"
        with CUDA tensors and Triton installed; and every parameter one the kernels take
        (anything else, e.g. a non-contiguous or complex parameter, runs the torch path).
        Worked out once per micro-step."""
        key = ("runs_triton", index)
        if key not in self._micro_step_cache:
            self._micro_step_cache[key] = self._kernels_take(group)
        return self._micro_step_cache[key]

    def _kernels_take(self, group):
        params = group["params"]
        # A process group runs the torch path: its update averages between fold and move.
        if group["backend"] == "torch" or not params or self._averager is not None:
            return False
        if group["backend"] == "auto" and not (all(p.is_cuda for p in params)
                                               and triton_can_run(params)):
            return False
        from .kernels import kernel_can_take
        return all(kernel_can_take(p) for p in params)

    def _triton_micro_step(self, index, group, grads, accum_steps, grad_scale, found_inf):
        """One micro-step of a Triton group: per bucket, a launch over the gradients not yet
        folded (in fold_in_backward mode, those hooks stashed) and the window's bookkeeping."""
        buckets = {}
        for param, grad in zip(group["params"], grads):
            buckets.setdefault((param.device, param.dtype), []).append(grad)
        for (device, dtype), bucket_grads in buckets.items():
            window = self._device_window(index, group, device, dtype)
            row = [g if g is not None else held for g, held in zip(bucket_grads, window.row)]
            self._triton_launch(group, window, row, accum_steps, grad_scale, found_inf)

    def _triton_fold_in_backward(self, index, group, param, grad, accum_steps):
        """A hook's fold on the Triton path: a large gradient gets its own launch now; a small
        one waits in the bucket's stash for step() (or a flush once the stash is large)."""
        from .kernels import tables
        window = self._device_window(index, group, param.device, param.dtype)
        t = window.index[param]
        if grad.numel() >= tables.HOOK_LAUNCH_MIN_NUMEL:
            self._triton_launch(group, window, grad, accum_steps, None, None, hook_tensor=t)
            window.mark_folded([t])
            return
        window.stash(t, grad)
        if window.stashed_numel >= tables.STASH_MAX_NUMEL:
            stashed = window.stashed()
            self._triton_launch(group, window, stashed, accum_steps, None, None, flush=True)
            window.mark_folded([t for t, g in enumerate(stashed) if g is not None])

    def _device_window(self, index, group, device, dtype):
        """The DeviceWindow of a bucket, (re)built when its set of tensors changed; checked
        once per micro-step."""
        key = (index, device, dtype)
        window = self._device_windows.get(key)
        if ("window", key) not in self._micro_step_cache:
            params = [p for p in group["params"] if p.device == device and p.dtype == dtype]
            states = [self.state[p] for p in params]
            slots = list(zip(*[self._triton_slots(group, p, s) for p, s in zip(params, states)]))
            if window is None or not window.matches(params, slots):
                window = self._build_device_window(params, states, slots)
                self._device_windows[key] = window
            self._micro_step_cache[("window", key)] = True
        return window

    def _build_device_window(self, params, states, slots):
        from .kernels import DeviceWindow
        self._sync_window()
        folds = [state.pop("window_folds", 0) for state in states]
        updates = [self._triton_initial_updates(state) for state in states]
        window = DeviceWindow(params, slots, folds, updates,
                              (self._micro_step, self._window_accum_steps or 0,
                               int(self._updated), self._num_updates))
        self._triton_built(window, states)
        return window

    def _triton_slots(self, group, param, state):
        raise NotImplementedError

    def _triton_initial_updates(self, state):
        raise NotImplementedError

    def _triton_launch(self, group, window, grads, accum_steps, grad_scale, found_inf, **launch):
        raise NotImplementedError

    def _triton_export(self, group, entry, folds, updates):
        raise NotImplementedError

    def _triton_built(self, window, states):
        """Called once a DeviceWindow is built over ``states`` (Adam ties ``step`` to it)."""

    def _fold_group(self, group, group_params, grads, accum_steps, last, grad_scale, move=True):
        """Plan one micro-step of some of a group's parameters (all of them in step(), one in a
        hook): which fold, which fold first in this window, which move (none without ``move``);
        run it; then advance each parameter's fold count."""
        moves = last and move
        if self._averager is not None and group["accum_reduction"] == "sum":
            # Ranks average their windows, so each folds R times its share of the window sum.
            grad_scale = (1.0 if grad_scale is None else grad_scale) / self._averager.world_size
        params, planned_grads, first = [], [], []
        for param, grad in zip(group_params, grads):
            folds = self.state[param].get("window_folds", 0)
            # A parameter with no gradient now still moves on the last micro-step if it got
            # gradients earlier in the window; one with none in the whole window stays put.
            if grad is None and not (moves and folds):
                continue
            params.append(param)
            planned_grads.append(grad)
            first.append(folds == 0)
        if not params:
            return
        self._run_micro_step(group, params, planned_grads, first, [moves] * len(params),
                             accum_steps, grad_scale)
        for param in params:
            state = self.state[param]
            if moves:
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

    def state_dict(self):
        """torch.optim's state_dict plus the window position under ``"accum"``. Parameters on
        the Triton path get their device bookkeeping written into their entries (a sync)."""
        self._sync_window()
        state_dict = super().state_dict()
        index = {id(p): i for i, p in
                 enumerate(p for group in self.param_groups for p in group["params"])}
        for (group_index, *_), window in self._device_windows.items():
            group = self.param_groups[group_index]
            for param, folds, updates in zip(window.params, *window.counters()):
                if index[id(param)] not in state_dict["state"]:
                    continue
                entry = dict(state_dict["state"][index[id(param)]])
                if folds:
                    entry["window_folds"] = folds
                self._triton_export(group, entry, folds, updates)
                state_dict["state"][index[id(param)]] = entry
        state_dict["accum"] = {"micro_step": self._micro_step,
                               "window_accum_steps": self._window_accum_steps,
                               "num_updates": self._num_updates}
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
        self._num_updates, self._updated = window["num_updates"], False
        self._window_open, self._window_known = micro_step > 0, True
        self._device_windows = {}  # rebuilt from the loaded state on the next step
        self._micro_step_cache.clear()

    def _use_foreach(self, params):
        """The multi-tensor form where torch has native foreach kernels, as torch.optim does."""
        return all(p.is_cuda for p in params)


def as_real(tensor):
    """Complex tensors are folded as their real views, as torch.optim does."""
    if tensor is not None and torch.is_complex(tensor):
        return torch.view_as_real(tensor)
    return tensor
