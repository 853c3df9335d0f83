"""The Tiger, Lion and Muon math (accumopt.functional.tiger / lion / muon), driven through
several windows of k micro-batches, against independent references stepped once per window on
the window gradient Ḡ: Tiger's and Lion's rules written out here in float64, and
torch.optim.Muon itself for Muon. Also: the foreach forms give the single-tensor forms' bits.

Ḡ is the mean (or sum) of a window's micro-batch gradients, a micro-batch without a gradient
counting as zero; a parameter with no gradient in a whole window is left untouched, state
included. The driver plans each micro-step as accumopt's window bookkeeping does: a parameter
enters a micro-step when it has a gradient, or on the window's last micro-step when it had one
earlier (an update-only step, gradient None); ``first`` marks its first fold of the window.
"""
import importlib.util
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accumopt.functional import muon as muon_module
from accumopt.functional.lion import lion_micro_step
from accumopt.functional.muon import muon_micro_step
from accumopt.functional.tiger import tiger_micro_step

SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny bfloat16 matmuls (Newton–Schulz) on the CPU take ~10 ms each with 2 threads on a
    loaded machine and ~3 µs with 1. Both sides of every comparison run under this setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

window_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "n": st.integers(1, 4),
    "ks": st.lists(st.integers(1, 4), min_size=1, max_size=3),
    "reduction": st.sampled_from(["mean", "sum"]),
    "maximize": st.booleans(),
    "grad_scale": st.sampled_from([None, 1024.0]),
    "fresh": st.booleans(),   # zero initial moments: with zeroed gradient entries, sign(0) = 0
})


# ----------------------------------------------------------------------------------------------
# The problem: parameters, initial state and every micro-batch's gradient, in float64.

def make_problem(seed, n, ks, shapes):
    """Returns (params, windows): windows[c][t][p] is parameter p's gradient on micro-step t of
    window c (float64), or None. Some gradient entries are exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    windows = []
    for k in ks:
        window = []
        for _ in range(k):
            row = []
            for shape in shapes:
                if float(torch.rand((), generator=gen)) < 0.35:
                    row.append(None)
                    continue
                g = torch.randn(shape, generator=gen, dtype=torch.float64)
                g[torch.rand(shape, generator=gen) < 0.2] = 0.0
                row.append(g)
            window.append(row)
        windows.append(window)
    return params, windows


def random_shapes(seed, n, two_d=False):
    gen = torch.Generator().manual_seed(seed + 7)
    shapes = []
    for _ in range(n):
        ndim = 2 if two_d else int(torch.randint(0, 4, (), generator=gen))
        shapes.append(tuple(int(torch.randint(1, 6, (), generator=gen)) for _ in range(ndim)))
    return shapes


def like(params, seed, zero=False):
    gen = torch.Generator().manual_seed(seed + 11)
    return [torch.zeros_like(p) if zero else torch.randn(p.shape, generator=gen,
                                                          dtype=torch.float64) for p in params]


def window_gradient(window, p, reduction, maximize):
    """Ḡ of parameter p (float64), or None when it got no gradient in the whole window."""
    grads = [row[p] for row in window if row[p] is not None]
    if not grads:
        return None
    total = torch.zeros_like(grads[0])
    for g in grads:
        total += g
    if reduction == "mean":
        total = total / len(window)
    return -total if maximize else total


def drive(step, params, states, windows, *, dtypes, grad_scale, **hyper):
    """Run ``step`` micro-step by micro-step over the windows, planning each micro-step as
    accumopt's window bookkeeping does. ``states`` are lists of per-parameter tensors passed
    after the gradients; an entry may be None (an accumulator that is never read)."""
    n = len(params)
    for window in windows:
        k = len(window)
        folds = [0] * n
        for t, row in enumerate(window):
            last = t == k - 1
            idx = [p for p in range(n) if row[p] is not None or (last and folds[p] > 0)]
            if not idx:
                continue
            scale = 1.0 if grad_scale is None else grad_scale
            grads = [None if row[p] is None else (row[p] * scale).to(dtypes[p]) for p in idx]
            step([params[p] for p in idx], grads, *([lst[p] for p in idx] for lst in states),
                 [folds[p] == 0 for p in idx], [last] * len(idx), accum_steps=k,
                 grad_scale=grad_scale, **hyper)
            for p in idx:
                folds[p] = 0 if last else folds[p] + 1


def cast(tensors, dtypes):
    return [None if t is None else t.to(d) for t, d in zip(tensors, dtypes)]


def assert_lists_close(actual, expected, what, **tol):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e, msg=lambda m: f"{what} {i}: {m}", **tol)


def assert_lists_equal(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None:
            continue
        assert torch.equal(a, e), f"{what} {i}: {a} vs {e}"


# ----------------------------------------------------------------------------------------------
# Tiger

def tiger_reference(params, exp_avgs, windows, *, lr, beta, weight_decay, lr_scale, reduction,
                    maximize):
    params = [p.clone() for p in params]
    exp_avgs = [m.clone() for m in exp_avgs]
    for window in windows:
        for p in range(len(params)):
            grad = window_gradient(window, p, reduction, maximize)
            if grad is None:
                continue
            theta, m = params[p], beta * exp_avgs[p] + (1 - beta) * grad
            decay = weight_decay
            if lr_scale == "rms":
                s = math.sqrt(float((theta ** 2).mean()))
            elif lr_scale == "row_rms":
                s = (theta ** 2).mean(dim=-1, keepdim=True).sqrt() if theta.ndim else \
                    math.sqrt(float(theta ** 2))
            elif lr_scale == "half":
                s, decay = 0.5, 0.0
            else:
                s = 1.0
            params[p] = theta - lr * s * (torch.sign(m) + decay * theta)
            exp_avgs[p] = m
    return params, exp_avgs


TIGER_HYPER = st.fixed_dictionaries({
    "lr_scale": st.sampled_from(["rms", "row_rms", "half", None]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "beta": st.sampled_from([0.965, 0.5]),
})


@SETTINGS
@given(c=window_case, h=TIGER_HYPER)
def test_tiger_equals_per_window_rule(c, h):
    shapes = random_shapes(c["seed"], c["n"])
    params, windows = make_problem(c["seed"], c["n"], c["ks"], shapes)
    exp_avgs = like(params, c["seed"], zero=c["fresh"])
    expected = tiger_reference(params, exp_avgs, windows, lr=0.05, reduction=c["reduction"],
                               maximize=c["maximize"], **h)
    actual = [[t.clone() for t in params], [m.clone() for m in exp_avgs]]
    drive(tiger_micro_step, actual[0], [actual[1]], windows, dtypes=[torch.float64] * c["n"],
          grad_scale=c["grad_scale"], lr=0.05, maximize=c["maximize"],
          accum_reduction=c["reduction"], **h)
    assert_lists_close(actual[0], expected[0], "param", rtol=1e-10, atol=1e-12)
    assert_lists_close(actual[1], expected[1], "exp_avg", rtol=1e-10, atol=1e-12)


def mixed_dtypes(seed, n):
    """float32 / float64 only: on the CPU, torch's in-place foreach multiply by a Python scalar
    (torch._foreach_mul_(tensors, 0.99)) rounds the scalar to the tensors' dtype first, which
    tensor.mul_(0.99) does not, so bfloat16 / float16 forms differ by that rounding (as the
    SGD and Adam forms do)."""
    gen = torch.Generator().manual_seed(seed + 13)
    choices = [torch.float32, torch.float64]
    return [choices[int(torch.randint(len(choices), (), generator=gen))] for _ in range(n)]


@SETTINGS
@given(c=window_case, h=TIGER_HYPER)
def test_tiger_foreach_equals_single_tensor(c, h):
    shapes = random_shapes(c["seed"], c["n"])
    params, windows = make_problem(c["seed"], c["n"], c["ks"], shapes)
    dtypes = mixed_dtypes(c["seed"], c["n"])
    exp_avgs = like(params, c["seed"], zero=c["fresh"])
    runs = []
    for foreach in (False, True):
        state = [cast(params, dtypes), cast(exp_avgs, dtypes)]
        drive(tiger_micro_step, state[0], [state[1]], windows, dtypes=dtypes,
              grad_scale=c["grad_scale"], lr=0.05, maximize=c["maximize"],
              accum_reduction=c["reduction"], foreach=foreach, **h)
        runs.append(state)
    for what, single, multi in zip(("param", "exp_avg"), *runs):
        assert_lists_equal(multi, single, what)


@pytest.mark.parametrize("lr_scale", ["rms", "row_rms"])
def test_tiger_bfloat16_scales_in_float32(lr_scale):
    """bfloat16 parameters: s is taken in float32, and the result is the float64 rule's up to
    bfloat16 rounding (fixed seed: no sign of m lands on the other side of zero)."""
    shapes = [(4, 6), (3, 5)]
    params, windows = make_problem(5, 2, [3, 2], shapes)
    params = [p.bfloat16().double() for p in params]
    windows = [[[None if g is None else g.bfloat16().double() for g in row] for row in window]
               for window in windows]
    exp_avgs = like(params, 5)
    hyper = dict(lr=0.05, beta=0.9, weight_decay=0.1, lr_scale=lr_scale)
    expected = tiger_reference(params, exp_avgs, windows, reduction="mean", maximize=False,
                               **hyper)
    actual = [cast(params, [torch.bfloat16] * 2), cast(exp_avgs, [torch.bfloat16] * 2)]
    drive(tiger_micro_step, actual[0], [actual[1]], windows, dtypes=[torch.bfloat16] * 2,
          grad_scale=None, maximize=False, accum_reduction="mean", **hyper)
    assert_lists_close(actual[0], expected[0], "param", rtol=2 ** -7, atol=1e-3)
    assert_lists_close(actual[1], expected[1], "exp_avg", rtol=2 ** -6, atol=1e-3)


def test_tiger_sign_zero_and_half_ignores_weight_decay():
    """sign(0) = 0 moves a parameter by weight decay alone; lr_scale="half" drops the decay."""
    theta = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    grad = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for lr_scale, expected in ((None, [1 - 0.1 * 0.5, -2 - 0.1 * (1 - 1.0), 3 - 0.1 * 1.5]),
                               ("half", [1.0, -2 - 0.05, 3.0])):
        p, m = theta.clone(), torch.zeros(3, dtype=torch.float64)
        tiger_micro_step([p], [grad], [m], [True], [True], lr=0.1, beta=0.9,
                         weight_decay=0.5, lr_scale=lr_scale, maximize=False, accum_steps=1,
                         accum_reduction="mean")
        torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Lion

def lion_reference(params, exp_avgs, windows, *, lr, beta1, beta2, weight_decay, reduction,
                   maximize):
    params = [p.clone() for p in params]
    exp_avgs = [m.clone() for m in exp_avgs]
    for window in windows:
        for p in range(len(params)):
            grad = window_gradient(window, p, reduction, maximize)
            if grad is None:
                continue
            m = exp_avgs[p]
            theta = params[p] * (1 - lr * weight_decay)
            params[p] = theta - lr * torch.sign(beta1 * m + (1 - beta1) * grad)
            exp_avgs[p] = beta2 * m + (1 - beta2) * grad
    return params, exp_avgs


LION_HYPER = st.fixed_dictionaries({
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "beta1": st.sampled_from([0.9, 0.5]),
    "beta2": st.sampled_from([0.99, 0.9]),
})


@SETTINGS
@given(c=window_case, h=LION_HYPER)
def test_lion_equals_per_window_rule(c, h):
    shapes = random_shapes(c["seed"], c["n"])
    params, windows = make_problem(c["seed"], c["n"], c["ks"], shapes)
    exp_avgs = like(params, c["seed"], zero=c["fresh"])
    expected = lion_reference(params, exp_avgs, windows, lr=0.05, reduction=c["reduction"],
                              maximize=c["maximize"], **h)
    # The accumulators start as garbage: a first fold must overwrite, never add.
    accums = like(params, c["seed"] + 1)
    actual = [[t.clone() for t in params], accums, [m.clone() for m in exp_avgs]]
    drive(lion_micro_step, actual[0], actual[1:], windows, dtypes=[torch.float64] * c["n"],
          grad_scale=c["grad_scale"], lr=0.05, maximize=c["maximize"],
          accum_reduction=c["reduction"], **h)
    assert_lists_close(actual[0], expected[0], "param", rtol=1e-10, atol=1e-12)
    assert_lists_close(actual[2], expected[1], "exp_avg", rtol=1e-10, atol=1e-12)


@SETTINGS
@given(c=window_case, h=LION_HYPER, no_accums=st.booleans())
def test_lion_foreach_equals_single_tensor(c, h, no_accums):
    shapes = random_shapes(c["seed"], c["n"])
    params, windows = make_problem(c["seed"], c["n"], c["ks"], shapes)
    dtypes = mixed_dtypes(c["seed"], c["n"])
    exp_avgs = like(params, c["seed"], zero=c["fresh"])
    runs = []
    for foreach in (False, True):
        # Without accumulators only k = 1 windows can run (first fold = update: Ḡ is direct).
        accums = [None] * c["n"] if no_accums else cast(like(params, c["seed"] + 1), dtypes)
        state = [cast(params, dtypes), accums, cast(exp_avgs, dtypes)]
        drive(lion_micro_step, state[0], state[1:], [w[:1] for w in windows] if no_accums
              else windows, dtypes=dtypes, grad_scale=c["grad_scale"], lr=0.05,
              maximize=c["maximize"], accum_reduction=c["reduction"], foreach=foreach, **h)
        runs.append(state)
    for what, single, multi in zip(("param", "accum", "exp_avg"), *runs):
        assert_lists_equal(multi, single, what)


# ----------------------------------------------------------------------------------------------
# Muon: torch.optim.Muon itself, stepped once per window on Ḡ

def muon_reference(params, bufs, windows, *, reduction, maximize, **hyper):
    """torch.optim.Muon on float32 copies, one step per window with .grad = Ḡ (float64 sums
    cast to float32) on the parameters that got a gradient, None on the others."""
    params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Muon(params, **hyper)
    for p, buf in zip(params, bufs):
        opt.state[p]["momentum_buffer"] = buf.clone()
    for window in windows:
        for i, p in enumerate(params):
            grad = window_gradient(window, i, reduction, maximize)
            p.grad = None if grad is None else grad.to(p.dtype)
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]


def run_muon(params, bufs, windows, *, nesterov, grad_scale, reduction, maximize, **hyper):
    params = [p.clone() for p in params]
    bufs = [b.clone() for b in bufs]
    accums = [torch.full_like(p, float("nan")) for p in params] if nesterov else \
        [None] * len(params)
    drive(muon_micro_step, params, [accums, bufs], windows, dtypes=[torch.float32] * len(params),
          grad_scale=grad_scale, nesterov=nesterov, maximize=maximize,
          accum_reduction=reduction, **hyper)
    return params, bufs


MUON_HYPER = st.fixed_dictionaries({
    "lr": st.sampled_from([0.02, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "nesterov": st.booleans(),
    "adjust_lr_fn": st.sampled_from([None, "original", "match_rms_adamw"]),
    "ns_steps": st.sampled_from([5, 3]),
})


@SETTINGS
@given(c=window_case, h=MUON_HYPER, momentum=st.sampled_from([0.95, 0.0]))
def test_muon_equals_torch_muon_per_window(c, h, momentum):
    """Random float32 gradients: Ḡ and the folded buffer carry float32 rounding that torch's
    single step on Ḡ does not, so the buffers agree to float32 tolerance and the parameters to
    what one flipped bfloat16 rounding in Newton–Schulz's input allows (a few % of lr'·O;
    measured ≤ 0.04 on entries of O up to ~0.7). The dyadic test below asserts bit equality."""
    shapes = random_shapes(c["seed"], c["n"], two_d=True)
    params, windows = make_problem(c["seed"], c["n"], c["ks"], shapes)
    params = [p.float() for p in params]
    bufs = [b.float() for b in like(params, c["seed"], zero=c["fresh"])]
    hyper = dict(h, momentum=momentum, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7)
    expected = muon_reference(params, bufs, windows, reduction=c["reduction"],
                              maximize=c["maximize"], **hyper)
    actual = run_muon(params, bufs, windows, grad_scale=c["grad_scale"],
                      reduction=c["reduction"], maximize=c["maximize"], **hyper)
    for i, (a, e) in enumerate(zip(actual[1], expected[1])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"buf {i}: {m}")
    for i, (a, e, p) in enumerate(zip(actual[0], expected[0], params)):
        step = muon_module._adjust_lr(h["lr"], h["adjust_lr_fn"], p.shape) * len(windows)
        torch.testing.assert_close(a, e, rtol=0, atol=0.1 * step + 1e-6,
                                   msg=lambda m: f"param {i}: {m}")


@settings(max_examples=20, deadline=None)
@given(c=window_case, h=MUON_HYPER, momentum=st.sampled_from([0.95, 0.0]))
def test_muon_single_micro_batch_windows_are_torch_muon_bit_for_bit(c, h, momentum):
    """k = 1 on random float32 values: the fold is torch's own lerp on the same gradient, so
    buffers and parameters are torch.optim.Muon's bit for bit, every option included."""
    shapes = random_shapes(c["seed"], c["n"], two_d=True)
    params, windows = make_problem(c["seed"], c["n"], [1] * len(c["ks"]), shapes)
    params = [p.float() for p in params]
    bufs = [b.float() for b in like(params, c["seed"], zero=c["fresh"])]
    hyper = dict(h, momentum=momentum, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7)
    expected = muon_reference(params, bufs, windows, reduction=c["reduction"],
                              maximize=c["maximize"], **hyper)
    actual = run_muon(params, bufs, windows, grad_scale=c["grad_scale"],
                      reduction=c["reduction"], maximize=c["maximize"], **hyper)
    assert_lists_equal(actual[1], expected[1], "buf")
    assert_lists_equal(actual[0], expected[0], "param")


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), n=st.integers(1, 3),
       ks=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3),
       reduction=st.sampled_from(["mean", "sum"]), maximize=st.booleans(),
       grad_scale=st.sampled_from([None, 1024.0]), fresh=st.booleans(),
       momentum=st.sampled_from([0.5, 0.75, 0.875, 0.0]), h=MUON_HYPER)
def test_muon_bitwise_equals_torch_muon_on_exact_sums(seed, n, ks, reduction, maximize,
                                                      grad_scale, fresh, momentum, h):
    """Gradients and buffers on a coarse dyadic grid, k a power of two and 1-μ = 2^-j: every
    fold, sum and lerp is exact in float32, so the window gradient and the buffer are torch's
    bit for bit — and so, through torch's own Newton–Schulz, are the parameters."""
    shapes = random_shapes(seed, n, two_d=True)
    params, windows = make_problem(seed, n, ks, shapes)
    windows = [[[None if g is None else (g * 16).round() / 16 for g in row] for row in window]
               for window in windows]
    params = [p.float() for p in params]
    bufs = [((b * 16).round() / 16).float() for b in like(params, seed, zero=fresh)]
    hyper = dict(h, momentum=momentum, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7)
    expected = muon_reference(params, bufs, windows, reduction=reduction, maximize=maximize,
                              **hyper)
    actual = run_muon(params, bufs, windows, grad_scale=grad_scale, reduction=reduction,
                      maximize=maximize, **hyper)
    assert_lists_equal(actual[1], expected[1], "buf")
    assert_lists_equal(actual[0], expected[0], "param")


def test_muon_uses_torch_newton_schulz_and_refuses_non_matrices():
    from torch.optim import _muon
    assert muon_module._zeropower_via_newtonschulz is _muon._zeropower_via_newtonschulz
    assert muon_module._adjust_lr is _muon._adjust_lr
    with pytest.raises(ValueError, match="2D"):
        muon_micro_step([torch.zeros(3)], [torch.ones(3)], [None], [torch.zeros(3)], [True],
                        [True], lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=False,
                        ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                        adjust_lr_fn=None, maximize=False, accum_steps=1,
                        accum_reduction="mean")


def test_muon_fallback_copy_matches_torch(monkeypatch):
    """Where torch.optim._muon cannot be imported the module's own copy runs: same bits."""
    from torch.optim import _muon
    monkeypatch.setitem(sys.modules, "torch.optim._muon", None)
    spec = importlib.util.spec_from_file_location("accumopt.functional._muon_fallback",
                                                  muon_module.__file__)
    fallback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fallback)
    assert fallback._zeropower_via_newtonschulz is not _muon._zeropower_via_newtonschulz
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 5), (5, 3), (4, 4), (1, 6), (7, 1)):
        g = torch.randn(shape, generator=gen)
        for steps in (1, 5):
            ours = fallback._zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), steps, 1e-7)
            theirs = _muon._zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), steps, 1e-7)
            assert torch.equal(ours, theirs)
        for fn in (None, "original", "match_rms_adamw"):
            assert fallback._adjust_lr(0.1, fn, torch.Size(shape)) == \
                _muon._adjust_lr(0.1, fn, torch.Size(shape))
