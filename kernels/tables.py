"""Host side of the kernels: one bucket's device tables (built once per set of tensors), the
device-side window counters, and the two launches of a micro-step."""
import contextlib
import math

import torch
import triton.language as tl

from .micro_step import FOLDED as _FOLDED
from .micro_step import HOOKED as _HOOKED
from .micro_step import micro_step_kernel
from .window import window_kernel

BLOCK = 1024          # elements per program: 8 fp32 per thread at 4 warps, two 128-bit accesses
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
    parameter, its gradient and its state; a DTensor's own data_ptr() is 0). The fold and the
    move are elementwise, so each rank runs them on its own shards."""
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
        self._signature = self.signature(self.params, self.slots)
        n = len(self.params)
        rows = [_addresses(self.params), [0] * n] + [_addresses(slot) for slot in self.slots]
        rows += [[0] * n] * (N_SLOTS - len(rows))
        self.table = torch.tensor(rows, dtype=torch.int64, device=self.device)
        numels = [local_tensor(p).numel() for p in self.params]
        self.numels = torch.tensor(numels, dtype=torch.int64, device=self.device)
        chunks = [math.ceil(numel / BLOCK) for numel in numels]
        self.chunks = chunks
        self.first_chunk = [sum(chunks[:t]) for t in range(n)]
        self.index = {p: t for t, p in enumerate(self.params)}
        work = [[t for t, c in enumerate(chunks) for _ in range(c)],
                [i for c in chunks for i in range(c)]]
        self.n_work = len(work[0])
        self.work = torch.tensor(work, dtype=torch.int32, device=self.device).reshape(2, -1)
        self.folds = torch.tensor(folds, dtype=torch.int32, device=self.device)
        self.updates = torch.tensor(updates, dtype=torch.float32, device=self.device)
        self.window = torch.tensor(window, dtype=torch.int32, device=self.device)
        self._grads_alive = []
        self.row = [None] * n
        self.stashed_numel = 0

    @staticmethod
    def signature(params, slots):
        return tuple(_addresses(params)) + tuple(a for slot in slots for a in _addresses(slot))

    def matches(self, params, slots):
        return self._signature == self.signature(params, slots)

    def set_grads(self, grads):
        """Point the gradient row at this micro-step's gradients (0 where None, HOOKED where a
        hook folded it already): one host-to-device copy, no sync."""
        grads = [_kernel_ready(g) for g in grads]
        # Gradients (and copies) the kernel reads must live until it has read them; on CUDA the
        # stream orders their reuse after it, on the CPU the interpreter runs synchronously.
        self._grads_alive = grads
        pinned = self.device.type == "cuda"
        row = torch.tensor(_addresses(grads), dtype=torch.int64)
        self.table[1].copy_(row.pin_memory() if pinned else row, non_blocking=pinned)

    def counters(self):
        """(folds, updates) per tensor, read back to the host (a sync)."""
        return self.folds.tolist(), self.updates.tolist()

    def position(self):
        """(micro_step, window accum_steps, updated, num_updates), read back (a sync)."""
        return tuple(self.window.tolist())

    def stash(self, t, grad):
        self.row[t] = grad
        self.stashed_numel += local_tensor(grad).numel()

    def stashed(self):
        """The gradient row holding only the stashed gradients (for a flush)."""
        return [g if torch.is_tensor(g) else None for g in self.row]

    def mark_folded(self, indices, code=HOOKED):
        for t in indices:
            self.row[t] = code
        self.stashed_numel = 0

    def set_window_length(self, length):
        """End the current window after ``length`` micro-steps (a short window a training
        framework ends with step()): the device's window length, written without a sync."""
        self.window[1].fill_(int(length))

    def end_micro_step(self):
        self.row = [None] * len(self.params)
        self.stashed_numel = 0

    def launch(self, variant, grads, **options):
        """A micro-step: the fold kernel over every (tensor, block), then the bookkeeping kernel.

        ``grads`` is the bucket's gradient row (a tensor, None or HOOKED per tensor). With
        ``hook_tensor`` it is that one tensor's gradient and only its blocks run (from a
        fold_in_backward hook); with ``flush`` only tensors with a gradient run, and with
        ``fold_only`` too they are folded but never moved. None of these counts the micro-step:
        the step's own launch does."""
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
        def on_device(x):
            return None if x is None else x.to(self.device, torch.float32, non_blocking=True)

        grad_scale, found_inf = on_device(grad_scale), on_device(found_inf)
        dummy = self.updates  # stands in for an absent scalar tensor; never read
        scalars = dict(grad_scale_ptr=dummy if grad_scale is None else grad_scale,
                       found_inf_ptr=dummy if found_inf is None else found_inf)
        work, n_programs, hook_grad_addr = self.work, self.n_work, 0
        if hook_tensor is not None:
            work = self.work[:, self.first_chunk[hook_tensor]:]
            n_programs, hook_grad_addr = self.chunks[hook_tensor], _addresses([grads])[0]
        if n_programs:
            micro_step_kernel[(n_programs,)](
                work, self.n_work, self.numels, self.table, len(self.params), self.folds,
                self.updates, self.window, hook_grad_addr=hook_grad_addr,
                accum_steps=int(accum_steps), lr=float(lr),
                beta1=float(beta1), beta2=float(beta2), log2_beta1=_log2(beta1),
                log2_beta2=_log2(beta2), eps=float(eps), weight_decay=float(weight_decay),
                momentum=float(momentum), dampening=float(dampening), VARIANT=variant,
                DTYPE=self.dtype, MAXIMIZE=bool(maximize), MEAN=accum_reduction == "mean",
                DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(amsgrad),
                NESTEROV=bool(nesterov), MOMENTUM_BUFFER=bool(momentum_buffer),
                HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                HOOK=hook_tensor is not None, MOVE_UNFOLDED=not flush, FOLD_ONLY=bool(fold_only),
                BLOCK=BLOCK, **scalars)
        if hook_tensor is not None or flush:
            return
        window_kernel[(1,)](self.table, len(self.params), self.folds, self.updates, self.window,
                            scalars["found_inf_ptr"], int(accum_steps),
                            HAS_FOUND_INF=found_inf is not None, BLOCK=WINDOW_BLOCK)


def _log2(beta):
    # log2(0) = -inf makes β^c = exp2(c·log2 β) exactly 0 for β = 0.
    return math.log2(beta) if beta > 0 else float("-inf")
