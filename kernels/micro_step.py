"""The fused micro-step kernel: one pass over every element of every tensor of a bucket (one
param group's tensors of one device and dtype) folds this micro-batch's gradient and, on the
window's last micro-step, moves the parameter.

The math is accumopt.functional's, element for element (see its docstrings for the formulas);
what the functional takes as per-tensor host lists the kernel reads from device tables:

* ``table``   int64 [6, n]: addresses of θ, g and up to four state tensors, slot order per
              variant (the launchers' ``*_SLOTS``). The g row holds 0 for no gradient this
              micro-step, ``HOOKED`` (1, never an address) for a tensor a fold_in_backward
              hook has already folded (and on the last micro-step moved) this micro-step, and
              ``FOLDED`` (2) for one folded but not moved yet (by a state_dict or copy
              taken between backward and step(), which must not move parameters);
* ``folds``   int32 [n]: micro-steps folded into each tensor this window (0: next fold decays);
* ``updates`` fp32 [n]: updates each tensor has had (Adam's step; 0 is SGD's "fresh" buffer);
* ``window``  int32 [4]: good micro-steps folded this window, the window's accum_steps,
              whether the last micro-step moved the parameters, updates so far.

All four are written only by :mod:`accumopt.kernels.window`'s kernel, launched after this one,
so every program here reads the same values. ``found_inf`` (GradScaler) drops the whole
micro-batch on the device, without a host sync.

With ``HOOK`` the launch covers up to eight tensors from inside backward, named by scalars, not
the work table: ``hook_t0`` .. ``hook_t7`` with their gradients' addresses ``hook_grad0`` ..
``hook_grad7``; tensor i's blocks are programs [``hook_end{i-1}``, ``hook_end{i}``) (from 0;
an unused slot's end is past every program). With ``MOVE_UNFOLDED`` off, tensors
without a gradient are left alone even on the last micro-step (a flush in the middle of
backward, before they may still get one). ``FOLD_ONLY`` folds without moving even on the last
micro-step (the tensors are marked ``FOLDED``, and step()'s launch moves them).
"""
import triton
import triton.language as tl

SGDM, SGD_EXACT, ADAM_MEAN_OF_SQUARES, ADAM_SQUARE_OF_MEAN = 0, 1, 2, 3
# In the gradient row: folded by a hook earlier this micro-step (never an address). A
# constexpr, because the compiler reads no other globals inside a kernel.
HOOKED = tl.constexpr(1)
FOLDED = tl.constexpr(2)


@triton.jit
def _addr(table_ptr, slot, t, n_tensors):
    """The address of tensor ``t`` in ``slot`` of the table."""
    return tl.load(table_ptr + slot * n_tensors + t)


@triton.jit
def _load(addr, offs, in_bounds, DTYPE: tl.constexpr, EVEN: tl.constexpr):
    """A block of the tensor at ``addr`` as fp32 (math is fp32 whatever the storage dtype)."""
    # Tables and hook gradients are only ever 16-byte aligned tensors. The hint must sit on the
    # pointer, after the cast from int64 (on the integer it is lost): full blocks then use
    # 128-bit loads.
    ptr = tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)
    if EVEN:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=in_bounds, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store(addr, offs, in_bounds, x, DTYPE: tl.constexpr, EVEN: tl.constexpr):
    """Store an fp32 block at ``addr``, rounding to the tensor's dtype (nearest-even)."""
    ptr = tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)
    if EVEN:
        tl.store(ptr + offs, x.to(DTYPE))
    else:
        tl.store(ptr + offs, x.to(DTYPE), mask=in_bounds)


@triton.jit
def _adam_move(p, m, v, vmax_addr, offs, in_bounds, c, lr, log2_beta1, log2_beta2, eps,
               weight_decay, DTYPE: tl.constexpr, DECOUPLED: tl.constexpr,
               AMSGRAD: tl.constexpr, EVEN: tl.constexpr):
    """torch.optim.Adam's parameter move with the moments folded; c is this update's count."""
    # β^c as exp2(c·log2 β) in fp32: no pow in the interpreter; β = 0 gives log2 β = -inf, β^c = 0.
    bias_correction1 = 1.0 - tl.exp2(c * log2_beta1)
    bias_correction2 = 1.0 - tl.exp2(c * log2_beta2)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_addr, offs, in_bounds, DTYPE, EVEN), v)
        _store(vmax_addr, offs, in_bounds, v, DTYPE, EVEN)
    # torch's eps placement: eps is added to √v̂ after bias correction.
    denom = tl.sqrt(v) / tl.sqrt(bias_correction2) + eps
    return p - (lr / bias_correction1) * m / denom


@triton.jit
def _fold_block(table_ptr, t, n_tensors, grad_addr, offs, in_bounds, has_grad, first, last,
                fresh, c, w_win, w_est, k, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                weight_decay, momentum, dampening, VARIANT: tl.constexpr, DTYPE: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, NESTEROV: tl.constexpr,
                MOMENTUM_BUFFER: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """Fold one block of tensor ``t`` and, on the last micro-step, move it: the variant's math
    from accumopt.functional, element for element, in fp32."""
    p_addr = _addr(table_ptr, 0, t, n_tensors)
    s2 = _addr(table_ptr, 2, t, n_tensors)
    s3 = _addr(table_ptr, 3, t, n_tensors)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    g = zero
    if has_grad:
        g = _load(grad_addr, offs, in_bounds, DTYPE, EVEN)
    if VARIANT == 0:  # SGDM, bufferless: slot 2 is the momentum buffer
        buf = _load(s2, offs, in_bounds, DTYPE, EVEN)
        p = zero
        if last | (first & (weight_decay != 0.0)):
            p = _load(p_addr, offs, in_bounds, DTYPE, EVEN)
        if has_grad:
            if first:
                x = g * w_win + weight_decay * p
                buf = tl.where(fresh, x, momentum * buf + (1.0 - dampening) * x)
            else:
                buf = buf + tl.where(fresh, 1.0, 1.0 - dampening) * w_win * g
            _store(s2, offs, in_bounds, buf, DTYPE, EVEN)
        if last:
            _store(p_addr, offs, in_bounds, p - lr * buf, DTYPE, EVEN)
    elif VARIANT == 2:  # Adam mean_of_squares, bufferless: slots 2, 3, 4 are m, v, max v
        m = _load(s2, offs, in_bounds, DTYPE, EVEN)
        v = _load(s3, offs, in_bounds, DTYPE, EVEN)
        coupled = weight_decay
        if DECOUPLED:
            coupled = weight_decay * 0.0  # decoupled decay is applied on the move instead
        p = zero
        if last | (has_grad & (coupled != 0.0)):
            p = _load(p_addr, offs, in_bounds, DTYPE, EVEN)
        if has_grad:
            decay = coupled * p
            if first:
                # Count every micro-batch as gradient-free ((ĝ+λθ)² = (λθ)²), then this one.
                d = g * w_est + decay
                m = beta1 * m + (1.0 - beta1) * (g * w_win + decay)
                v = (beta2 * v + (1.0 - beta2) / k * d * d
                     + (1.0 - beta2) * (k - 1.0) / k * decay * decay)
            else:
                e = g * w_est
                m = m + (1.0 - beta1) * w_win * g
                v = v + (1.0 - beta2) / k * e * (e + 2.0 * decay)
            _store(s2, offs, in_bounds, m, DTYPE, EVEN)
            _store(s3, offs, in_bounds, v, DTYPE, EVEN)
        if last:
            p = _adam_move(p, m, v, _addr(table_ptr, 4, t, n_tensors), offs, in_bounds, c, lr,
                           log2_beta1, log2_beta2, eps, weight_decay, DTYPE, DECOUPLED, AMSGRAD,
                           EVEN)
            _store(p_addr, offs, in_bounds, p, DTYPE, EVEN)
    else:  # exact variants: slot 2 is the accumulator of Ḡ
        acc = zero
        if has_grad:
            acc = g * w_win
            if not first:
                acc += _load(s2, offs, in_bounds, DTYPE, EVEN)
            if not last:  # on the last micro-step Ḡ is used at once, never stored
                _store(s2, offs, in_bounds, acc, DTYPE, EVEN)
        else:
            acc = _load(s2, offs, in_bounds, DTYPE, EVEN)
        if last:
            p = _load(p_addr, offs, in_bounds, DTYPE, EVEN)
            if VARIANT == 1:  # SGD with nesterov or momentum = 0: slot 3 is the buffer
                d = acc + weight_decay * p
                if MOMENTUM_BUFFER:
                    buf = tl.where(fresh, d, momentum * _load(s3, offs, in_bounds, DTYPE, EVEN)
                                   + (1.0 - dampening) * d)
                    _store(s3, offs, in_bounds, buf, DTYPE, EVEN)
                    if NESTEROV:
                        d = d + momentum * buf
                    else:
                        d = buf
                p = p - lr * d
            else:  # Adam square_of_mean: slots 3, 4, 5 are m, v, max v
                mean = acc
                if not DECOUPLED:
                    mean = acc + weight_decay * p
                s4 = _addr(table_ptr, 4, t, n_tensors)
                m = beta1 * _load(s3, offs, in_bounds, DTYPE, EVEN) + (1.0 - beta1) * mean
                v = beta2 * _load(s4, offs, in_bounds, DTYPE, EVEN) + (1.0 - beta2) * mean * mean
                _store(s3, offs, in_bounds, m, DTYPE, EVEN)
                _store(s4, offs, in_bounds, v, DTYPE, EVEN)
                p = _adam_move(p, m, v, _addr(table_ptr, 5, t, n_tensors), offs, in_bounds, c,
                               lr, log2_beta1, log2_beta2, eps, weight_decay, DTYPE, DECOUPLED,
                               AMSGRAD, EVEN)
            _store(p_addr, offs, in_bounds, p, DTYPE, EVEN)


@triton.jit
def _in_turn(pid, end0, end1, end2, end3, end4, end5, end6, v0, v1, v2, v3, v4, v5, v6, v7):
    """v_i for the program ``pid`` of a hook launch: slot i's programs are [end_{i-1}, end_i)
    (the ends never decrease, so the last slot begun at or before pid is pid's)."""
    v = tl.where(pid >= end0, v1, v0)
    v = tl.where(pid >= end1, v2, v)
    v = tl.where(pid >= end2, v3, v)
    v = tl.where(pid >= end3, v4, v)
    v = tl.where(pid >= end4, v5, v)
    v = tl.where(pid >= end5, v6, v)
    return tl.where(pid >= end6, v7, v)


# A hook launch's scalars (see the module docstring): HOOK_GROUP tensors' gradient addresses and
# indices, and the ends of all but the last one's programs.
HOOK_GROUP = 8
HOOK_ARGS = tuple([f"hook_grad{i}" for i in range(HOOK_GROUP)] +
                  [f"hook_t{i}" for i in range(HOOK_GROUP)] +
                  [f"hook_end{i}" for i in range(HOOK_GROUP - 1)])


# Integer arguments Triton would specialize on (== 1, divisible by 16) gain nothing here (strides
# of scalar table loads, an address the loads already hint as aligned, a count, a tensor index):
# one compiled kernel serves every table size, every hook group and every accum_steps.
@triton.jit(do_not_specialize=list(HOOK_ARGS) + ["n_work", "n_tensors", "accum_steps"])
def micro_step_kernel(work_ptr, hook_grad0, hook_grad1, hook_grad2, hook_grad3, hook_grad4,
                      hook_grad5, hook_grad6, hook_grad7, hook_t0, hook_t1, hook_t2, hook_t3,
                      hook_t4, hook_t5, hook_t6, hook_t7, hook_end0, hook_end1, hook_end2,
                      hook_end3, hook_end4, hook_end5, hook_end6, n_work,
                      numel_ptr, table_ptr, n_tensors,
                      folds_ptr, updates_ptr, window_ptr, grad_scale_ptr, found_inf_ptr,
                      accum_steps, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                      weight_decay, momentum, dampening, VARIANT: tl.constexpr,
                      DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr, MEAN: tl.constexpr,
                      DECOUPLED: tl.constexpr,
                      AMSGRAD: tl.constexpr, NESTEROV: tl.constexpr,
                      MOMENTUM_BUFFER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr, HOOK: tl.constexpr,
                      MOVE_UNFOLDED: tl.constexpr, FOLD_ONLY: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One program per (tensor, block): a column of the work table (``n_work`` is its row
    stride), or with ``HOOK`` a block of the hook tensors'."""
    pid = tl.program_id(0)
    if HOOK:
        # The hook launch's tensors in turn, from scalars (no table load before the data's).
        t = _in_turn(pid, hook_end0, hook_end1, hook_end2, hook_end3, hook_end4, hook_end5,
                     hook_end6, hook_t0, hook_t1, hook_t2, hook_t3, hook_t4, hook_t5, hook_t6,
                     hook_t7)
        grad_addr = _in_turn(pid, hook_end0, hook_end1, hook_end2, hook_end3, hook_end4,
                             hook_end5, hook_end6, hook_grad0, hook_grad1, hook_grad2,
                             hook_grad3, hook_grad4, hook_grad5, hook_grad6, hook_grad7)
        begin = _in_turn(pid, hook_end0, hook_end1, hook_end2, hook_end3, hook_end4,
                         hook_end5, hook_end6, 0, hook_end0, hook_end1, hook_end2, hook_end3,
                         hook_end4, hook_end5, hook_end6)
        # int64 offsets: a tensor may hold more than 2^31 elements.
        start = (pid - begin).to(tl.int64) * BLOCK
    else:
        t = tl.load(work_ptr + pid)
        start = tl.load(work_ptr + n_work + pid).to(tl.int64) * BLOCK
        grad_addr = tl.load(table_ptr + n_tensors + t)
    numel = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)

    pos = tl.load(window_ptr)
    # accum_steps changes take effect when a window starts (pos = 0); inside one, the stored k.
    k_steps = tl.where(pos == 0, accum_steps, tl.load(window_ptr + 1))
    last = pos + 1 == k_steps
    if FOLD_ONLY:
        last = pos < 0  # never: this launch folds, step()'s moves
    folds = tl.load(folds_ptr + t)
    has_grad = grad_addr > FOLDED
    # Work where there is a gradient, or to move a tensor folded earlier in the window that got
    # no gradient now (and was not folded by a hook this micro-step either), or one FOLDED.
    live = has_grad
    if MOVE_UNFOLDED:
        live = live | (last & (((folds > 0) & (grad_addr == 0)) | (grad_addr == FOLDED)))
    if HAS_FOUND_INF:
        live = live & (tl.load(found_inf_ptr) == 0.0)
    if live:
        updates = tl.load(updates_ptr + t)
        k = k_steps.to(tl.float32)
        sign = 1.0
        if MAXIMIZE:
            sign = -1.0
        if HAS_GRAD_SCALE:
            # Unscaling is folded into the weights: one multiply, no pass of its own.
            sign = sign / tl.load(grad_scale_ptr).to(tl.float32)
        if MEAN:
            w_win = sign / k
            w_est = sign
        else:
            w_win = sign
            w_est = sign * k
        if start + BLOCK <= numel:
            _fold_block(table_ptr, t, n_tensors, grad_addr, offs, None, has_grad, folds == 0,
                        last, updates == 0.0, updates + 1.0, w_win, w_est, k, lr, beta1, beta2,
                        log2_beta1, log2_beta2, eps, weight_decay, momentum, dampening, VARIANT,
                        DTYPE, DECOUPLED, AMSGRAD, NESTEROV, MOMENTUM_BUFFER, True, BLOCK)
        else:
            _fold_block(table_ptr, t, n_tensors, grad_addr, offs, offs < numel, has_grad,
                        folds == 0, last, updates == 0.0, updates + 1.0, w_win, w_est, k, lr,
                        beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, momentum,
                        dampening, VARIANT, DTYPE, DECOUPLED, AMSGRAD, NESTEROV,
                        MOMENTUM_BUFFER, False, BLOCK)
