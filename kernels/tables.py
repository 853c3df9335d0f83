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
from .micro_step import HOOKED as _HOOKED
from .micro_step import micro_step_kernel
from .window import window_kernel

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
# fold_in_backward: a gradient of at least this many elements is folded by its own launch inside
# backward; smaller ones are held until step() (or until they add up to STASH_MAX_NUMEL) and
# folded together, so small parameters do not cost a launch each.
HOOK_LAUNCH_MIN_NUMEL = 1 << 16
STASH_MAX_NUMEL = 1 << 22
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


def _device_guard(device):
    """Triton launches on the current CUDA device's stream: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class DeviceWindow:
    """Tables and counters for one bucket: parameters of one param group on one device with one
    dtype, and their state tensors in the variant's slot order (None where a slot is unused).

    ``folds``, ``updates`` and ``window`` start from the host's bookkeeping and from then on
    live on the device (see accumopt.kernels.micro_step for what each holds).

    In fold_in_backward mode a micro-step's gradients arrive one by one: ``fold_now`` launches
    one tensor's fold, ``stash`` holds a small gradient for the step's launch, and ``row`` is
    the gradient row that launch uses (stashed gradients, HOOKED for the ones already folded).
    """

    def __init__(self, params, slots, folds, updates, window):
        self.params = list(params)
        self.slots = [list(slot) for slot in slots]
        self.device = self.params[0].device
        self.dtype = KERNEL_DTYPES[self.params[0].dtype]
        self.block, self.num_warps = LAUNCH_SHAPES[self.params[0].dtype]
        self.dtensor = any(type(p).__name__ == "DTensor" for p in self.params)
        self._signature = self.signature(self.params, self.slots)
        n = len(self.params)
        rows = [_addresses(self.params), [0] * n] + [_addresses(slot) for slot in self.slots]
        rows += [[0] * n] * (N_SLOTS - len(rows))
        self.table = torch.tensor(rows, dtype=torch.int64, device=self.device)
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
        self.retired = False  # written back into the host state and dropped by the optimizer
        self._launch_options = {}     # launch options -> the kernel's keyword arguments
        self._hook_work = {}          # tensor -> its columns of the work table (hook launches)
        self.row = [None] * n
        self.has_marks = False    # whether ``row`` holds a stashed gradient or a mark
        self.stashed_numel = 0

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

    def set_grads(self, grads):
        """Point the gradient row at this micro-step's gradients (0 where None, HOOKED where a
        hook folded it already): one host-to-device copy from a reused pinned buffer, no sync.
        The common case (dense, aligned, contiguous plain tensors) costs one data_ptr() and one
        is_contiguous() per gradient; anything else (a DTensor's local shard, a strided or
        misaligned gradient, which gets a dense copy) takes the slow path."""
        if self.dtensor:     # a DTensor's own data_ptr() is not its local shard's
            addresses = [0 if g is None else g if g.__class__ is int else -1 for g in grads]
        else:
            addresses = [0 if g is None else g if g.__class__ is int else
                         g.data_ptr() if g.is_contiguous() else -1 for g in grads]
        slow = []
        if self.has_marks or min(addresses) <= 0 or functools.reduce(operator.or_, addresses) & 15:
            # Something is not a plain aligned gradient (one check over all of them first).
            slow = [t for t, a in enumerate(addresses) if a < 0 or a > FOLDED and a & 15]
            if 0 in addresses:   # None, or a tensor reporting no address (an empty one)
                slow += [t for t, a in enumerate(addresses) if a == 0 and grads[t] is not None]
        # Gradients (and copies) the kernel reads must live until it has read them; on CUDA the
        # stream orders their reuse after it, on the CPU the interpreter runs synchronously.
        self._grads_alive = []
        for t in slow:
            g = _kernel_ready(grads[t])
            self._grads_alive.append(g)
            addresses[t] = g.data_ptr() or EMPTY_ADDRESS
        row = torch.frombuffer(array.array("q", addresses), dtype=torch.int64)
        if self.device.type != "cuda":
            self.table[1].copy_(row)
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
        self.table[1].copy_(self._staging[i], non_blocking=True)
        self._staged[i] = torch.cuda.Event()
        self._staged[i].record()

    def counters(self):
        """(folds, updates) per tensor, read back to the host (a sync)."""
        return self.folds.tolist(), self.updates.tolist()

    def position(self):
        """(micro_step, window accum_steps, updated, num_updates), read back (a sync)."""
        return tuple(self.window.tolist())

    def stash(self, t, grad):
        self.row[t] = grad
        self.stashed_numel += self.numel_of[t]
        self.has_marks = True

    def stashed(self):
        """The gradient row holding only the stashed gradients (for a flush)."""
        return [g if torch.is_tensor(g) else None for g in self.row]

    def mark_folded(self, indices, code=HOOKED):
        for t in indices:
            self.row[t] = code
        self.stashed_numel = 0
        self.has_marks = self.has_marks or bool(indices)

    def set_window_length(self, length):
        """End the current window after ``length`` micro-steps (a short window a training
        framework ends with step()): the device's window length, written without a sync."""
        self.window[1].fill_(int(length))

    def end_micro_step(self):
        self.row = [None] * len(self.params)
        self.stashed_numel = 0
        self.has_marks = False

    def launch(self, variant, grads, **options):
        """A micro-step: the fold kernel over every (tensor, block), then the bookkeeping kernel.

        ``grads`` is the bucket's gradient row (a tensor, None or HOOKED per tensor). With
        ``hook_tensor`` it is that one tensor's gradient and only its blocks run (from a
        fold_in_backward hook); with ``flush`` only tensors with a gradient run, and with
        ``fold_only`` too they are folded but never moved. None of these counts the micro-step:
        the step's own launch does."""
        if self.device.type != "cuda":
            return self._launch(variant, grads, **options)
        with _device_guard(self.device):
            self._launch(variant, grads, **options)

    def _launch(self, variant, grads, *, accum_steps, lr, weight_decay, maximize,
                accum_reduction, beta1=0.0, beta2=0.0, eps=0.0, momentum=0.0, dampening=0.0,
                decoupled_weight_decay=False, amsgrad=False, nesterov=False,
                momentum_buffer=False, grad_scale=None, found_inf=None, hook_tensor=None,
                flush=False, fold_only=False):
        if hook_tensor is None:
            self.set_grads(grads)
        else:
            grads = _kernel_ready(grads)
            self._grads_alive = [grads]
        dummy = self.updates  # stands in for an absent scalar tensor; never read
        scalars = dict(grad_scale_ptr=dummy, found_inf_ptr=dummy)
        if grad_scale is not None:
            scalars["grad_scale_ptr"] = grad_scale.to(self.device, torch.float32,
                                                      non_blocking=True)
        if found_inf is not None:
            scalars["found_inf_ptr"] = found_inf.to(self.device, torch.float32,
                                                    non_blocking=True)
        work, n_work, n_programs, hook_grad_addr = self.work, self.n_work, self.n_work, 0
        if hook_tensor is not None:
            work = self._hook_work.get(hook_tensor)
            if work is None:     # the tensor's own columns of the work table, a view kept
                work = self._hook_work[hook_tensor] = self.work[:, self.first_chunk[hook_tensor]:]
            n_programs = self.chunks[hook_tensor]
            hook_grad_addr = grads.data_ptr() or EMPTY_ADDRESS
        elif not flush and self.large and self.n_small_work < self.n_work and all(
                grads[t].__class__ is int and grads[t] == HOOKED for t in self.large):
            # Every large tensor was folded (and moved) by its hook: only the small ones work.
            work, n_work, n_programs = self.small_work, self.n_small_work, self.n_small_work
        if n_programs:
            options = (variant, accum_steps, lr, beta1, beta2, eps, weight_decay, momentum,
                       dampening, maximize, accum_reduction, decoupled_weight_decay, amsgrad,
                       nesterov, momentum_buffer, grad_scale is not None, found_inf is not None,
                       hook_tensor is not None, flush, fold_only)
            kwargs = self._launch_options.get(options)
            if kwargs is None:
                # The kernel's keyword arguments, built once per set of options (micro-steps
                # repeat them): scalars as the kernel takes them, the constexprs.
                if len(self._launch_options) > 64:   # hyperparameters that keep changing
                    self._launch_options.clear()
                kwargs = dict(
                    accum_steps=int(accum_steps), lr=float(lr), beta1=float(beta1),
                    beta2=float(beta2), log2_beta1=_log2(beta1), log2_beta2=_log2(beta2),
                    eps=float(eps), weight_decay=float(weight_decay), momentum=float(momentum),
                    dampening=float(dampening), VARIANT=variant, DTYPE=self.dtype,
                    MAXIMIZE=bool(maximize), MEAN=accum_reduction == "mean",
                    DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(amsgrad),
                    NESTEROV=bool(nesterov), MOMENTUM_BUFFER=bool(momentum_buffer),
                    HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                    HOOK=hook_tensor is not None, MOVE_UNFOLDED=not flush,
                    FOLD_ONLY=bool(fold_only), BLOCK=self.block, num_warps=self.num_warps)
                if self.device.type == "cuda":
                    kwargs["maxnreg"] = MAX_REGISTERS
                self._launch_options[options] = kwargs
            micro_step_kernel[(n_programs,)](
                work, n_work, self.numels, self.table, len(self.params), self.folds,
                self.updates, self.window, hook_grad_addr=hook_grad_addr, **scalars, **kwargs)
        if hook_tensor is not None or flush:
            return
        window_kernel[(1,)](self.table, len(self.params), self.folds, self.updates, self.window,
                            scalars["found_inf_ptr"], int(accum_steps),
                            HAS_FOUND_INF=found_inf is not None, BLOCK=WINDOW_BLOCK)


def _log2(beta):
    # log2(0) = -inf makes β^c = exp2(c·log2 β) exactly 0 for β = 0.
    return math.log2(beta) if beta > 0 else float("-inf")
