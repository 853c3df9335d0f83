"""Host side of the kernels: one bucket's device tables (built once per set of tensors), the
device-side window counters, and the two launches of a micro-step."""
import array
import contextlib
import functools
import math
import operator

import torch
import triton.language as tl

from .micro_step import FOLDED as _FOLDED
from .micro_step import HOOK_GROUP
from .micro_step import HOOKED as _HOOKED
from .micro_step import micro_step_kernel
from .window import window_kernel

_is_contiguous = torch.Tensor.is_contiguous

# Elements and warps per program, per dtype: 8 elements per thread either way (so the fp32 math
# holds the same registers), which is two 128-bit accesses per fp32 tensor and one per bf16 /
# fp16 tensor, and the same bytes in flight per program (20 KB for an Adam fold). Set from
# reasoning, not yet from a GPU sweep (python -m benchmarks --only kernels --sweep times them).
LAUNCH_SHAPES = {torch.float32: (1024, 4), torch.bfloat16: (2048, 8), torch.float16: (2048, 8)}
BLOCK = LAUNCH_SHAPES[torch.float32][0]
# Registers per thread the compiler may use (CUDA): 64 lets 8 programs of 128 threads share an
# SM; Adam's fold-and-move would otherwise take 72 (78 with GradScaler).
MAX_REGISTERS = 64
WINDOW_BLOCK = 256    # tensors per iteration of the bookkeeping kernel
N_SLOTS = 6           # θ, g and up to four state tensors
# fold_in_backward: a gradient of at least this many elements is folded by a launch inside
# backward (shared with other large ones: see HOOK_GROUP); smaller ones are held until step() (or
# until they add up to STASH_MAX_NUMEL) and folded together, so small parameters do not cost a
# launch each.
HOOK_LAUNCH_MIN_NUMEL = 1 << 16
STASH_MAX_NUMEL = 1 << 22
# Large gradients share their hooks' launches: each is held until HOOK_GROUP (8) of them are, or
# they add up to HOOK_GROUP_MAX_NUMEL elements, then one launch folds them all. A launch costs
# the host about the same for one tensor as for eight; the held gradients cost memory, bounded
# so (4M elements, 16 MB in fp32: an Adam fold of that size takes a GPU about as long as a
# launch takes the host, so smaller groups would leave the GPU waiting on launches).
HOOK_GROUP_MAX_NUMEL = 1 << 22
_UNUSED_END = 2 ** 31 - 1     # a hook slot's end past every program: the slot is never reached
# The hook arguments (see micro_step_kernel) of a launch that is no hook's, and of a hook launch
# before its tensors are filled in.
_NO_HOOK = (0,) * (2 * HOOK_GROUP) + (_UNUSED_END,) * (HOOK_GROUP - 1)
_ZEROS = (0,) * (HOOK_GROUP - 1)
HOOKED = _HOOKED.value  # the gradient row's "folded by a hook already"
FOLDED = _FOLDED.value  # the gradient row's "folded for an export, not moved yet"
KERNEL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def local_tensor(tensor):
    """What the kernels address: the tensor itself, or a DTensor's local shard (an FSDP2
    parameter, its gradient and its state; a DTensor's own data_ptr() is not its shard's: 0,
    or an offset). The fold and the move are elementwise, so each rank runs them on its own
    shards."""
    if type(tensor).__name__ != "DTensor":
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def kernel_can_take(tensor):
    """The kernels take dense, 16-byte aligned fp32 / bf16 / fp16 tensors (for a DTensor, its
    local shard); the optimizer runs any group holding something else on the torch path."""
    tensor = local_tensor(tensor)
    return (tensor.dtype in KERNEL_DTYPES and tensor.is_contiguous()
            and tensor.data_ptr() % 16 == 0)


# An empty tensor's data_ptr() is 0, the gradient row's "no gradient"; it has no blocks, so this
# stand-in address that marks it present is never dereferenced.
EMPTY_ADDRESS = 16
_TENSOR = torch.Tensor   # (a hook's check of its gradient's class, without two lookups)


def _addresses(tensors):
    return [0 if t is None else t if isinstance(t, int) else
            local_tensor(t).data_ptr() or EMPTY_ADDRESS for t in tensors]


def _kernel_ready(grad):
    """The gradient itself, or a dense aligned copy when the kernel cannot take it (a view at an
    odd offset is contiguous but misaligned: a fresh allocation is aligned)."""
    if grad is None or isinstance(grad, int):
        return grad
    if grad.__class__ is torch.Tensor and grad.is_contiguous() and not grad.data_ptr() & 15:
        return grad      # the common case, checked first (a gradient has its param's dtype)
    grad = local_tensor(grad)
    if kernel_can_take(grad):
        return grad
    return grad.clone(memory_format=torch.contiguous_format)


class DeviceWindow:
    """Tables and counters for one bucket: parameters of one param group on one device with one
    dtype, and their state tensors in the variant's slot order (None where a slot is unused).

    ``folds``, ``updates`` and ``window`` start from the host's bookkeeping and from then on
    live on the device (see accumopt.kernels.micro_step for what each holds).

    In fold_in_backward mode a micro-step's gradients arrive one by one: ``take_hooked`` holds a
    large one until its group's launch (``launch_held``) and a small one for step()'s launch
    (``stash``), and ``row`` is the gradient row that launch uses (held and stashed gradients,
    HOOKED for the ones already folded).
    """

    def __init__(self, params, slots, folds, updates, window):
        self.params = list(params)
        self.slots = [list(slot) for slot in slots]
        self.device = self.params[0].device
        # Triton launches on the current CUDA device's stream: launches make the tensors'
        # device current, and a hook's short way runs only where it already is.
        self._device_index = self.device.index if self.device.type == "cuda" else None
        self._device = (torch.cuda.device(self.device) if self.device.type == "cuda"
                        else contextlib.nullcontext())
        self.dtype = KERNEL_DTYPES[self.params[0].dtype]
        self.block, self.num_warps = LAUNCH_SHAPES[self.params[0].dtype]
        self.dtensor = any(type(p).__name__ == "DTensor" for p in self.params)
        self._signature = self.signature(self.params, self.slots)
        n = len(self.params)
        rows = [_addresses(self.params), [0] * n] + [_addresses(slot) for slot in self.slots]
        rows += [[0] * n] * (N_SLOTS - len(rows))
        self.table = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self._grad_row = self.table[1]
        self._written = None      # the gradient row's numbers as last written
        self._plain_addresses = None  # the last gradient addresses found plain (see _plain)
        numels = [local_tensor(p).numel() for p in self.params]
        self.numel_of = numels                 # per tensor, its local numel (host ints)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=self.device)
        self._build_work(numels)
        self.index = {p: t for t, p in enumerate(self.params)}
        self.folds = torch.tensor(folds, dtype=torch.int32, device=self.device)
        self.updates = torch.tensor(updates, dtype=torch.float32, device=self.device)
        self.window = torch.tensor(window, dtype=torch.int32, device=self.device)
        self._grads_alive = []
        self._staging, self._staged, self._flip = None, None, 0
        self.plan = None      # the optimizer's plan of the group this window was checked under
        self._launch_options = {}     # launch options -> the kernel's keyword arguments
        # fold_in_backward, this micro-step: whether a hook has checked the bucket (set by the
        # optimizer), and the arguments of its hook launches once one has run (see
        # take_hooked); both cleared at the micro-step's end.
        self.hooks_checked = False
        self._hook_arguments = None
        self._kept_hook_arguments = None   # (key, arguments): see keep_hook_arguments
        self.hook_mark = HOOKED   # the mark of a hook's fold (set with hooks_checked)
        self.row = [None] * n
        # What the gradient row will hold for ``row``'s stashed gradients and marks (0 for
        # the rest), kept as they come: a step() after hooks writes it as it is.
        self.row_addresses = [0] * n
        self.has_marks = False    # whether ``row`` holds a stashed gradient or a mark
        self.stashed_numel = 0
        # The large tensors whose gradients wait in ``row`` for a launch, their elements, and
        # that launch's hook arguments and programs, filled in as they come.
        self.held = []
        self.held_numel = 0
        self._held_arguments = list(_NO_HOOK)
        self._held_programs = 0

    def _build_work(self, numels):
        """The work table, one (tensor, block) column per program, built on the device (a 7B
        bucket has millions of blocks; only per-tensor numbers are built on the host), and the
        smaller one of the tensors below HOOK_LAUNCH_MIN_NUMEL: in fold_in_backward mode, once
        hooks have folded every large tensor, step()'s launch needs only those."""
        host = torch.tensor(numels, dtype=torch.int64)
        chunks = (host + self.block - 1) // self.block
        first = torch.cumsum(chunks, 0) - chunks
        self.chunks, self.first_chunk = chunks.tolist(), first.tolist()
        self.n_work = sum(self.chunks)
        tensor_of = torch.repeat_interleave(
            torch.arange(len(numels), dtype=torch.int32, device=self.device),
            chunks.to(self.device), output_size=self.n_work)
        block_of = (torch.arange(self.n_work, dtype=torch.int32, device=self.device)
                    - first.to(self.device, torch.int32).index_select(0, tensor_of))
        self.work = torch.stack([tensor_of, block_of])
        self.large = [t for t, numel in enumerate(numels) if numel >= HOOK_LAUNCH_MIN_NUMEL]
        # row -> a tuple of the large tensors' entries (C-level: step() asks once per micro-step)
        self._large_entries = (operator.itemgetter(*self.large) if len(self.large) > 1 else
                               lambda row, large=tuple(self.large): tuple(row[t] for t in large))
        columns = [c for t, numel in enumerate(numels) if numel < HOOK_LAUNCH_MIN_NUMEL
                   for c in range(self.first_chunk[t], self.first_chunk[t] + self.chunks[t])]
        self.small_work = self.work.index_select(
            1, torch.tensor(columns, dtype=torch.int64, device=self.device)).contiguous()
        self.n_small_work = len(columns)

    @staticmethod
    def signature(params, slots):
        return tuple(_addresses(params)) + tuple(a for slot in slots for a in _addresses(slot))

    def matches(self, params, slots):
        return self._signature == self.signature(params, slots)

    def set_grads(self, grads, addresses=None):
        """Point the gradient row at this micro-step's gradients (0 where None, HOOKED where a
        hook folded it already): one host-to-device copy from a reused pinned buffer, no sync,
        and none when the row holds these numbers already.

        ``addresses``, when the caller has them (every gradient a tensor), are the gradients'
        data_ptr(): the common case (dense, aligned, contiguous plain tensors) then costs one
        is_contiguous() per gradient and a comparison with the last numbers. Anything else (a
        mark, a DTensor's local shard, a strided or misaligned gradient, which gets a dense
        copy) takes the general path. ``grads`` may be ``row`` itself (every gradient of this micro-step
        came through a hook): its addresses are kept already."""
        self._grads_alive = []
        if grads is self.row:
            addresses = self.row_addresses
        elif addresses is None or self.has_marks or self.dtensor or \
                not self._plain(grads, addresses):
            addresses = self._row_addresses(grads)
        self._write_row(addresses)

    def _plain(self, grads, addresses):
        """Whether every gradient is contiguous, at a non-zero 16-byte aligned address: the
        contiguity every time, the numbers only when they differ from the last ones that
        passed."""
        if not all(map(_is_contiguous, grads)):
            return False
        if addresses != self._plain_addresses:
            if min(addresses) <= 0 or functools.reduce(operator.or_, addresses) & 15:
                return False
            self._plain_addresses = addresses      # (the caller's list, never changed after)
        return True

    def _row_addresses(self, grads):
        """The gradient row's numbers, every kind of entry: marks as they are, 0 for None, the
        address of a kernel-ready tensor (a dense copy kept alive where it was not)."""
        if self.dtensor:     # a DTensor's own data_ptr() is not its local shard's
            addresses = [0 if g is None else g if g.__class__ is int else -1 for g in grads]
        else:
            addresses = [0 if g is None else g if g.__class__ is int else
                         g.data_ptr() if g.is_contiguous() else -1 for g in grads]
        slow = [t for t, a in enumerate(addresses) if a < 0 or a > FOLDED and a & 15]
        if 0 in addresses:   # None, or a tensor reporting no address (an empty one)
            slow += [t for t, a in enumerate(addresses) if a == 0 and grads[t] is not None]
        # Gradients (and copies) the kernel reads must live until it has read them; on CUDA the
        # stream orders their reuse after it, on the CPU the interpreter runs synchronously.
        for t in slow:
            g = _kernel_ready(grads[t])
            self._grads_alive.append(g)
            addresses[t] = g.data_ptr() or EMPTY_ADDRESS
        return addresses

    def _write_row(self, addresses):
        if addresses == self._written:
            return     # the device's row holds these already (the allocator reuses addresses)
        self._written = None                 # until the copy below is queued
        row = torch.frombuffer(array.array("q", addresses), dtype=torch.int64)
        if self.device.type != "cuda":
            self._grad_row.copy_(row)
            self._written = addresses.copy()     # (a kept list changes in place)
            return
        # Two pinned buffers in turn: one may still be read by the previous copy.
        if self._staging is None:
            self._staging = [torch.empty(len(addresses), dtype=torch.int64, pin_memory=True)
                             for _ in range(2)]
            self._staged = [None, None]
        i = self._flip = 1 - self._flip
        if self._staged[i] is not None:
            self._staged[i].synchronize()     # long done in practice: a micro-step ago
        self._staging[i].copy_(row)
        self._grad_row.copy_(self._staging[i], non_blocking=True)
        self._staged[i] = torch.cuda.Event()
        self._staged[i].record()
        self._written = addresses.copy()

    def counters(self):
        """(folds, updates) per tensor, read back to the host (a sync)."""
        return self.folds.tolist(), self.updates.tolist()

    def position(self):
        """(micro_step, window accum_steps, updated, num_updates), read back (a sync)."""
        return tuple(self.window.tolist())

    def stash(self, t, grad):
        """Hold tensor ``t``'s gradient (a dense copy where the kernel cannot take it) for the
        next launch of the gradient row."""
        grad = _kernel_ready(grad)
        self.row[t] = grad
        self.row_addresses[t] = grad.data_ptr() or EMPTY_ADDRESS
        self.stashed_numel += self.numel_of[t]
        self.has_marks = True

    def stashed(self):
        """The gradient row holding only the stashed gradients (for a flush)."""
        return [g if torch.is_tensor(g) else None for g in self.row]

    def mark_folded(self, indices, code=HOOKED):
        for t in indices:
            self.row[t] = self.row_addresses[t] = code
        self.has_marks = self.has_marks or bool(indices)

    def flushed(self, indices, code=HOOKED):
        """A launch of the gradient row has folded every held and stashed gradient (``indices``)."""
        self.mark_folded(indices, code)
        self.stashed_numel = 0
        self._drop_held()

    def _drop_held(self):
        self.held = []
        self.held_numel = 0
        self._held_arguments = list(_NO_HOOK)
        self._held_programs = 0

    def set_window_length(self, length):
        """End the current window after ``length`` micro-steps (a short window a training
        framework ends with step()): the device's window length, written without a sync."""
        self.window[1].fill_(int(length))

    def take_hooked(self, t, param):
        """A fold_in_backward hook of tensor ``t`` (its bucket checked this micro-step:
        ``hooks_checked``), the short way: a small gradient into the stash, a large one held
        for its group's launch, with the arguments an earlier hook launch of this micro-step
        prepared; ``param.grad`` is then None. False, with nothing done, where the full path
        must run: the bucket is not checked yet, ``t`` has a gradient or mark this micro-step
        already, the stash is full, no hook has launched yet this micro-step, or the gradient
        is not a plain kernel-ready tensor (a sparse one is not contiguous). (The optimizer
        keeps no route to a bucket of DTensors.)"""
        if not self.hooks_checked or self.row[t] is not None:
            return False
        grad = param.grad
        if grad.__class__ is not _TENSOR or not grad.is_contiguous():   # (None too)
            return False
        address = grad.data_ptr()
        if address & 15 or not address:
            return False
        numel = self.numel_of[t]
        if numel < HOOK_LAUNCH_MIN_NUMEL:
            numel += self.stashed_numel
            if numel >= STASH_MAX_NUMEL:
                return False
            # stash()'s bookkeeping, inline (once per small parameter per micro-step)
            self.row[t] = grad
            self.row_addresses[t] = address
            self.stashed_numel = numel
        else:
            if self._hook_arguments is None or (
                    self._device_index is not None and
                    torch.cuda.current_device() != self._device_index):
                return False
            self.row[t] = grad
            self.row_addresses[t] = address
            held = self.held
            i = len(held)
            held.append(t)
            arguments = self._held_arguments
            arguments[i] = address
            arguments[HOOK_GROUP + i] = t
            self._held_programs += self.chunks[t]
            if i < HOOK_GROUP - 1:
                arguments[2 * HOOK_GROUP + i] = self._held_programs
            self.held_numel += numel
            if i == HOOK_GROUP - 1 or self.held_numel >= HOOK_GROUP_MAX_NUMEL:
                self.launch_held()
        self.has_marks = True
        param.grad = None
        return True

    def keep_hook_arguments(self, key):
        """Keep this micro-step's hook launch arguments (once a hook has launched) for later
        micro-steps whose launches ``key`` says are the same (see reuse_hook_arguments)."""
        if self._hook_arguments is not None:
            self._kept_hook_arguments = (key, self._hook_arguments)

    def reuse_hook_arguments(self, key):
        """Make the hook launch arguments kept under ``key`` this micro-step's, if any are (the
        optimizer's key holds everything they are built from but the window's own tensors);
        whether they are."""
        kept = self._kept_hook_arguments
        if self._hook_arguments is None and kept is not None and kept[0] == key:
            self._hook_arguments = kept[1]
        return self._hook_arguments is not None

    def took(self, t):
        """Whether a hook has taken tensor ``t``'s gradient in this micro-step (held, stashed
        or folded)."""
        return self.hooks_checked and self.row[t] is not None

    def launch_held(self):
        """Fold (and on the window's last micro-step move) the held large gradients: one
        launch, with the arguments of this micro-step's hook launches."""
        held = self.held
        if not held:
            return
        row, addresses = self.row, self.row_addresses
        self._grads_alive = [row[t] for t in held]     # (until the launch has read them)
        rest, launch_options = self._hook_arguments
        micro_step_kernel[(self._held_programs,)](self.work, *self._held_arguments, *rest,
                                                  **launch_options)
        mark = self.hook_mark
        for t in held:
            row[t] = addresses[t] = mark
        self._drop_held()

    def retire(self):
        """The optimizer has written the counters back and dropped this window: hook routes to
        it are stale."""
        self.hooks_checked = False
        self._hook_arguments = None

    def end_micro_step(self):
        if self.has_marks:     # (nothing is stashed, held or marked without setting it)
            self.row = [None] * len(self.params)
            self.row_addresses = [0] * len(self.params)
            self.stashed_numel = 0
            self._drop_held()
            self.has_marks = False
        self.hooks_checked = False
        self._hook_arguments = None

    def launch(self, variant, grads, *, accum_steps, lr, weight_decay, maximize,
               accum_reduction, beta1=0.0, beta2=0.0, eps=0.0, momentum=0.0, dampening=0.0,
               decoupled_weight_decay=False, amsgrad=False, nesterov=False,
               momentum_buffer=False, grad_scale=None, found_inf=None, hook_tensor=None,
               flush=False, fold_only=False, addresses=None):
        """A micro-step: the fold kernel over every (tensor, block), then the bookkeeping kernel.

        ``grads`` is the bucket's gradient row (a tensor, None or HOOKED per tensor). With
        ``hook_tensor`` it is that one tensor's gradient and only its blocks run (from a
        fold_in_backward hook); with ``flush`` only tensors with a gradient run, and with
        ``fold_only`` too they are folded but never moved. None of these counts the micro-step:
        the step's own launch does. ``addresses``: the gradients' data_ptr(), when the caller
        has them (see set_grads)."""
        with self._device:
            self._launch(variant, grads, accum_steps, lr, beta1, beta2, eps, weight_decay,
                         momentum, dampening, maximize, accum_reduction,
                         decoupled_weight_decay, amsgrad, nesterov, momentum_buffer,
                         grad_scale, found_inf, hook_tensor, flush, fold_only, addresses)

    def _launch(self, variant, grads, accum_steps, lr, beta1, beta2, eps, weight_decay,
                momentum, dampening, maximize, accum_reduction, decoupled_weight_decay,
                amsgrad, nesterov, momentum_buffer, grad_scale, found_inf, hook_tensor, flush,
                fold_only, addresses):
        if hook_tensor is None:
            self.set_grads(grads, addresses)
        else:
            grads = _kernel_ready(grads)
            self._grads_alive = [grads]
        dummy = self.updates  # stands in for an absent scalar tensor; never read
        grad_scale_ptr = found_inf_ptr = dummy
        if grad_scale is not None:
            grad_scale_ptr = grad_scale.to(self.device, torch.float32, non_blocking=True)
        if found_inf is not None:
            found_inf_ptr = found_inf.to(self.device, torch.float32, non_blocking=True)
        work, n_work, n_programs, hook = self.work, self.n_work, self.n_work, _NO_HOOK
        if hook_tensor is not None:
            n_programs = self.chunks[hook_tensor]
            hook = ((grads.data_ptr() or EMPTY_ADDRESS,) + _ZEROS + (hook_tensor,) + _ZEROS
                    + _NO_HOOK[2 * HOOK_GROUP:])
        elif not flush and self.large and self.n_small_work < self.n_work and (
                self._large_entries(self.row_addresses).count(HOOKED) == len(self.large)
                if grads is self.row else   # (row_addresses holds only ints)
                all(grads[t].__class__ is int and grads[t] == HOOKED for t in self.large)):
            # Every large tensor was folded (and moved) by its hook: only the small ones work.
            work, n_work, n_programs = self.small_work, self.n_small_work, self.n_small_work
        if n_programs:
            options = (variant, accum_steps, lr, beta1, beta2, eps, weight_decay, momentum,
                       dampening, maximize, accum_reduction, decoupled_weight_decay, amsgrad,
                       nesterov, momentum_buffer, grad_scale is not None, found_inf is not None,
                       hook_tensor is not None, flush, fold_only)
            arguments = self._launch_options.get(options)
            if arguments is None:
                if len(self._launch_options) > 64:   # hyperparameters that keep changing
                    self._launch_options.clear()
                arguments = self._launch_options[options] = self._kernel_arguments(*options)
            tail, launch_options = arguments
            rest = (n_work, self.numels, self.table, len(self.params), self.folds,
                    self.updates, self.window, grad_scale_ptr, found_inf_ptr) + tail
            if hook_tensor is not None and grad_scale is None and found_inf is None:
                # The later hooks of this micro-step launch with the same arguments but their
                # own columns and gradient (see take_hooked).
                self._hook_arguments = (rest, launch_options)
            micro_step_kernel[(n_programs,)](work, *hook, *rest, **launch_options)
        if hook_tensor is not None or flush:
            return
        window_kernel[(1,)](self.table, len(self.params), self.folds, self.updates, self.window,
                            found_inf_ptr, int(accum_steps), found_inf is not None, WINDOW_BLOCK)

    def _kernel_arguments(self, variant, accum_steps, lr, beta1, beta2, eps, weight_decay,
                          momentum, dampening, maximize, accum_reduction,
                          decoupled_weight_decay, amsgrad, nesterov, momentum_buffer,
                          has_grad_scale, has_found_inf, hook, flush, fold_only):
        """The micro-step kernel's arguments from ``accum_steps`` on, in its signature's order
        (positional: a launch passes them as one tuple, not as ~30 keywords), and its launch
        options; built once per set of options, which micro-steps repeat."""
        tail = (int(accum_steps), float(lr), float(beta1), float(beta2), _log2(beta1),
                _log2(beta2), float(eps), float(weight_decay), float(momentum),
                float(dampening),
                # the constexprs: VARIANT, DTYPE, MAXIMIZE, MEAN, DECOUPLED, AMSGRAD, NESTEROV,
                # MOMENTUM_BUFFER, HAS_GRAD_SCALE, HAS_FOUND_INF, HOOK, MOVE_UNFOLDED,
                # FOLD_ONLY, BLOCK
                variant, self.dtype, bool(maximize), accum_reduction == "mean",
                bool(decoupled_weight_decay), bool(amsgrad), bool(nesterov),
                bool(momentum_buffer), has_grad_scale, has_found_inf, hook, not flush,
                bool(fold_only), self.block)
        launch_options = dict(num_warps=self.num_warps)
        if self.device.type == "cuda":
            launch_options["maxnreg"] = MAX_REGISTERS
        return tail, launch_options


def _log2(beta):
    # log2(0) = -inf makes β^c = exp2(c·log2 β) exactly 0 for β = 0.
    return math.log2(beta) if beta > 0 else float("-inf")
