"""Averaging the folded window across ranks (``process_group``).

Each rank folds its own micro-batches with no communication. On the update step every rank
holds its window's state (the momentum buffer for SGDM, m and v for mean_of_squares, the
accumulator for the exact variants), with the same decay applied everywhere; averaging it over the
ranks gives the state one process would have after all ranks' micro-batches, so every rank then
makes the same move.

The state travels in buckets: the parameters in reverse order (about the order backward finishes
them), split by device and dtype and cut at ``BUCKET_NUMEL`` elements, each bucket one flat
tensor all-reduced with SUM, then divided by the world size: every rank gets the same bits. Once
a bucket's state exists, its tensors become views of that flat tensor (each segment padded to 16
bytes, so the Triton kernels take them), and the all-reduce runs in place with no copies; a
bucket whose state cannot be one flat tensor (complex, strided, DTensor, mixed) is copied into one
for the collective and back.
Buckets are issued strictly in order, each as soon as all its parameters are ready (from
fold_in_backward's hooks, overlapping backward) and the rest by the update step, so the
collectives of every rank always pair up. Before the first bucket of a window goes a small
all-reduce of the window's accum_steps and update count, which catches ranks that disagree.
"""
import torch
import torch.distributed as dist

BUCKET_NUMEL = 1 << 23  # 32 MiB of fp32 per bucket


class WindowAverager:
    def __init__(self, process_group):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Invalid process_group: torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(f"Invalid process_group: {process_group!r} (must be a "
                             f"torch.distributed ProcessGroup, e.g. torch.distributed.group.WORLD)")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._buckets = []        # lists of params, in issue order
        self._flat = []           # per bucket: (flat tensor, offsets) its state is a view of
        self._reset()

    def _reset(self):
        self._ready = set()       # params whose window state is final this update
        self._issued = []         # (work, flat, tensors) per issued bucket, in order
        self._check = None        # (work, tensor, local) of the window check

    # ----- consistency checks -----------------------------------------------------------

    def check_identical(self, params):
        """Raise if the parameters differ across ranks (a byte checksum, exact whatever the
        reduction order): the ranks must start identical, as DDP's broadcast makes them."""
        local = torch.tensor([float(_byte_sum(params)), float(sum(p.numel() for p in params))],
                             dtype=torch.float64)
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:2], -both[2:]):
            raise RuntimeError("process_group: the parameters differ across ranks at the "
                               "optimizer's construction; broadcast them from one rank first "
                               "(DDP does it when it wraps the model)")

    def _start_check(self, accum_steps, num_updates, device):
        local = torch.tensor([accum_steps, num_updates], dtype=torch.float64, device=device)
        both = torch.cat([local, -local])
        work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._check = (work, both, local)

    def _finish_check(self):
        work, both, local = self._check
        work.wait()
        if not torch.equal(both[:2], -both[2:]):
            raise RuntimeError(
                f"process_group: ranks disagree on the window: this rank has accum_steps="
                f"{int(local[0])} after {int(local[1])} updates, others between "
                f"{[-both[2].item(), both[0].item()]} and {[-both[3].item(), both[1].item()]}; "
                f"every rank must use the same accum_steps and step every micro-batch")

    # ----- buckets --------------------------------------------------------------------------

    def _build(self, params):
        buckets, current, numel, key = [], [], 0, None
        for p in reversed(params):
            if current and ((p.device, p.dtype) != key or numel + p.numel() > BUCKET_NUMEL):
                buckets.append(current)
                current, numel = [], 0
            current.append(p)
            numel += p.numel()
            key = (p.device, p.dtype)
        if current:
            buckets.append(current)
        self._buckets = buckets
        self._flat = [None] * len(buckets)

    def bind_flat(self, keys_of, state):
        """Make each bucket's window state (``state[p][key]`` for ``key in keys_of[p]``) views of
        one flat tensor per bucket, copying the values in where they are not already; return the
        parameters whose state tensors were replaced. Buckets whose state is missing or cannot be
        flat stay as they are (copied for each all-reduce)."""
        moved = []
        for b, bucket in enumerate(self._buckets):
            entries = [(p, key) for p in bucket for key in keys_of[p]]
            tensors = [state.get(p, {}).get(key) for p, key in entries]
            if not tensors or not all(_flat_ready(t, tensors[0]) for t in tensors):
                self._flat[b] = None
                continue
            if self._flat[b] is not None and _views_of(tensors, *self._flat[b]):
                continue
            align = max(1, 16 // tensors[0].element_size())
            sizes = [-(-t.numel() // align) * align for t in tensors]
            flat = torch.zeros(sum(sizes), dtype=tensors[0].dtype, device=tensors[0].device)
            offsets, offset = [], 0
            for (p, key), t, size in zip(entries, tensors, sizes):
                view = flat[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                state[p][key] = view
                offsets.append(offset)
                offset += size
            self._flat[b] = (flat, offsets)
            moved += bucket
        return moved

    def set_params(self, params):
        """The optimizer's parameters, in param-group order (called as groups are added)."""
        self._build(params)

    def ready(self, param, window_state, accum_steps, num_updates):
        """A parameter's window state is final: issue every bucket, in order, whose parameters
        all are. ``window_state(param)`` gives the tensors to average."""
        self._ready.add(param)
        self._issue(window_state, accum_steps, num_updates, until=len(self._buckets))

    def _issue(self, window_state, accum_steps, num_updates, until):
        while len(self._issued) < until:
            bucket = self._buckets[len(self._issued)]
            if not all(p in self._ready for p in bucket):
                return
            tensors = [t for p in bucket for t in window_state(p)]
            if self._check is None:
                self._start_check(accum_steps, num_updates, tensors[0].device)
            bound = self._flat[len(self._issued)]
            if bound is not None and _views_of(tensors, *bound):
                flat, tensors = bound[0], None       # in place: the state is the flat tensor
            else:
                flat = torch.cat([_real(t).reshape(-1) for t in tensors])
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._issued.append((work, flat, tensors))

    def finish(self, params, window_state, accum_steps, num_updates):
        """The update step: every parameter is ready now; issue what is left, wait, and write
        the averages back into the state."""
        self._ready.update(params)
        self._issue(window_state, accum_steps, num_updates, until=len(self._buckets))
        if self._check is None:  # no bucket at all
            self._start_check(accum_steps, num_updates, params[0].device)
        self._finish_check()
        for work, flat, tensors in self._issued:
            work.wait()
            flat.div_(self.world_size)
            if tensors is None:
                continue
            offset = 0
            for t in tensors:
                view = _real(t)
                view.copy_(flat[offset:offset + view.numel()].view_as(view))
                offset += view.numel()
        self._reset()


def _flat_ready(tensor, first):
    """Whether a state tensor can be a view of a bucket's flat tensor (with ``first``'s)."""
    return (tensor is not None and tensor.__class__ is torch.Tensor and tensor.is_contiguous()
            and not tensor.is_complex() and tensor.dtype == first.dtype
            and tensor.device == first.device)


def _views_of(tensors, flat, offsets):
    """Whether ``tensors`` still are the views of ``flat`` at ``offsets``."""
    base, size = flat.data_ptr(), flat.element_size()
    return len(tensors) == len(offsets) and all(
        t.data_ptr() == base + offset * size and t.dtype == flat.dtype
        for t, offset in zip(tensors, offsets))


def _real(tensor):
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _byte_sum(params):
    total = 0
    for p in params:
        data = p.detach()
        data = _real(data) if data.is_complex() else data
        total += int(data.contiguous().view(-1).view(torch.uint8).sum(dtype=torch.int64))
    return total
