"""The window-bookkeeping kernel, launched after the micro-step kernel on the same stream: it
advances the device-side counters that kernel read (see accumopt.kernels.micro_step), so a
GradScaler-dropped micro-batch changes nothing and no host sync is needed to know it."""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_tensors", "accum_steps"])  # no recompiles per size or k
def window_kernel(table_ptr, n_tensors, folds_ptr, updates_ptr, window_ptr, found_inf_ptr,
                  accum_steps, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """A single program: per tensor, count the fold or reset on the update and count updates;
    then advance the window position, its k, ``updated`` and the update count."""
    pos = tl.load(window_ptr)
    k_steps = tl.where(pos == 0, accum_steps, tl.load(window_ptr + 1))
    last = pos + 1 == k_steps
    if HAS_FOUND_INF:
        good = tl.load(found_inf_ptr) == 0.0
    else:
        good = True
    if good:
        for block_start in range(0, n_tensors, BLOCK):
            idx = block_start + tl.arange(0, BLOCK)
            in_bounds = idx < n_tensors
            has_grad = tl.load(table_ptr + n_tensors + idx, mask=in_bounds, other=0) != 0
            folds = tl.load(folds_ptr + idx, mask=in_bounds, other=0)
            updates = tl.load(updates_ptr + idx, mask=in_bounds, other=0.0)
            moved = last & (has_grad | (folds > 0))
            tl.store(folds_ptr + idx, tl.where(last, 0, folds + has_grad.to(tl.int32)),
                     mask=in_bounds)
            tl.store(updates_ptr + idx, updates + moved.to(tl.float32), mask=in_bounds)
        tl.store(window_ptr, tl.where(last, 0, pos + 1))
        tl.store(window_ptr + 1, k_steps)
        tl.store(window_ptr + 2, last.to(tl.int32))
        tl.store(window_ptr + 3, tl.load(window_ptr + 3) + last.to(tl.int32))
    else:
        tl.store(window_ptr + 2, 0)
