"""max_grad_norm clips the window gradient Ḡ by its total 2-norm over every parameter, as
torch.nn.utils.clip_grad_norm_ clips standard accumulation's .grad before torch.optim's step:
in step mode, fold_in_backward and step_per_window, on both backends; opt.grad_norm is the norm
clip_grad_norm_ returns. The bufferless variants refuse it."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import DEVICE, TRITON_RUNS

K = 3
SHAPES = [(4, 3), (5,), (2,)]
VARIANTS = [
    (AccumSGDM, torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    (AccumSGDM, torch.optim.SGD, dict(momentum=0.0, maximize=True)),
    (AccumAdam, torch.optim.Adam, dict(second_moment="square_of_mean", amsgrad=True,
                                       weight_decay=0.1)),
    (AccumAdamW, torch.optim.AdamW, dict(second_moment="square_of_mean")),
]
IDS = ["sgd-nesterov", "sgd-momentum0-maximize", "adam-square_of_mean", "adamw-square_of_mean"]
MODES = ["step", "fold_in_backward", "step_per_window"]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="Triton cannot run here"))]


def problem(seed, windows):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    # Parameter 2 gets no gradient on odd micro-steps, and none at all in window 1.
    rows = [[None if i == 2 and (t % 2 or t // K == 1) else
             torch.randn(s, generator=gen, dtype=torch.float64) * (1 + t % 3)
             for i, s in enumerate(SHAPES)] for t in range(K * windows)]
    return init, rows


def standard_accumulation(torch_cls, kwargs, init, rows, max_norm):
    """torch.optim with .grad accumulation of loss / k and clip_grad_norm_ before each step."""
    kwargs = {k: v for k, v in kwargs.items() if k != "second_moment"}
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torch_cls(params, lr=0.05, **kwargs)
    out = []
    for t, row in enumerate(rows):
        sum((p * g).sum() for p, g in zip(params, row) if g is not None).div(K).backward()
        if (t + 1) % K == 0:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], max_norm)
            opt.step()
            opt.zero_grad()
            out.append(([p.detach().clone() for p in params], norm))
    return out


def accumopt_run(cls, kwargs, init, rows, max_norm, mode, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cpu" if backend == "torch" else DEVICE
    params = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in init]
    opt = cls(params, lr=0.05, accum_steps=K, max_grad_norm=max_norm, backend=backend,
              fold_in_backward=mode != "step", step_per_window=mode == "step_per_window",
              **kwargs)
    out = []
    for t, row in enumerate(rows):
        loss = sum((p * g.to(device, dtype)).sum() for p, g in zip(params, row) if g is not None)
        # step_per_window: the framework divides each loss; otherwise accumopt's mean does.
        (loss / K if mode == "step_per_window" else loss).backward()
        if mode != "step_per_window" or (t + 1) % K == 0:
            opt.step()
            opt.zero_grad()
        if opt.updated and (mode != "step_per_window" or (t + 1) % K == 0):
            out.append(([p.detach().double().cpu().clone() for p in params],
                        opt.grad_norm.double().cpu()))
    opt.remove_hooks()
    return out


def check(cls, torch_cls, kwargs, mode, backend, seed, max_norm):
    init, rows = problem(seed, 3)
    want = standard_accumulation(torch_cls, kwargs, init, rows, max_norm)
    got = accumopt_run(cls, kwargs, init, rows, max_norm, mode, backend)
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-6)
    assert len(got) == len(want) == 3, (len(got), len(want))
    for w, ((gp, gn), (wp, wn)) in enumerate(zip(got, want)):
        torch.testing.assert_close(gn, wn.double(), **tol, msg=lambda m: (
            f"{mode} {backend}, window {w}: grad_norm vs clip_grad_norm_'s: {m}"))
        for i, (a, b) in enumerate(zip(gp, wp)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: (
                f"{mode} {backend}, max_norm {max_norm}, window {w}, param {i}: {m}"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls,torch_cls,kwargs", VARIANTS, ids=IDS)
@settings(max_examples=8)
@given(seed=st.integers(0, 2 ** 16), max_norm=st.sampled_from([0.05, 0.7, 3.0, 1e6]))
def test_window_clipping_equals_clip_grad_norm_on_standard_accumulation(
        cls, torch_cls, kwargs, mode, seed, max_norm):
    check(cls, torch_cls, kwargs, mode, "torch", seed, max_norm)


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls,torch_cls,kwargs", VARIANTS[::2], ids=IDS[::2])
def test_window_clipping_on_the_triton_backend(monkeypatch, cls, torch_cls, kwargs, mode):
    import accumopt.kernels.tables as tables
    # The (4, 3) parameter gets its own launch inside backward; the rest are stashed.
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 10)
    for max_norm in (0.05, 1e6):
        check(cls, torch_cls, kwargs, mode, "triton", 11, max_norm)


@pytest.mark.parametrize("cls,kwargs,word", [
    (AccumSGDM, dict(momentum=0.9), "nesterov"),
    (AccumAdamW, dict(), "square_of_mean"),
    (AccumAdam, dict(second_moment="mean_of_squares"), "square_of_mean"),
])
def test_bufferless_variants_refuse_window_clipping_naming_the_exact_one(cls, kwargs, word):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="max_grad_norm") as err:
        cls([p], max_grad_norm=1.0, **kwargs)
    assert word in str(err.value)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "1.0", True])
def test_bad_max_grad_norm_is_refused(value):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AccumAdamW([p], max_grad_norm=value, second_moment="square_of_mean")


def test_max_grad_norm_none_turns_clipping_off_and_must_agree_across_groups():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AccumAdamW([p], max_grad_norm=None)
    assert opt.grad_norm is None
    with pytest.raises(ValueError, match="max_grad_norm"):
        AccumAdamW([{"params": [p]}, {"params": [q], "max_grad_norm": 1.0}],
                   second_moment="square_of_mean")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_last_windows_grad_norm(how):
    """grad_norm is the last window's norm, as clip_grad_norm_ returned it: a copy made after
    the window has it too."""
    import copy
    import pickle
    init, rows = problem(5, 1)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AccumAdam(params, second_moment="square_of_mean", accum_steps=K, max_grad_norm=0.5,
                    backend="torch")
    for row in rows:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
    means = [sum(r[i] for r in rows if r[i] is not None) / K for i in range(len(SHAPES))]
    want = torch.stack([m.norm() for m in means]).norm()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    torch.testing.assert_close(clone.grad_norm, want)
    torch.testing.assert_close(opt.grad_norm, want)
