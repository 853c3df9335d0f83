"""fold_in_backward on the Triton backend: per-tensor launches inside backward for large
gradients, a stash folded at step() (or flushed when large) for small ones; the same numbers as
Triton step mode, bit for bit, and as the torch backend."""
import pytest
import torch

import accumopt.kernels.tables as tables
from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import DEVICE, needs_triton

pytestmark = needs_triton
SHAPES = [(40, 30), (7,), (300,), (3, 5), (1100,), (2,)]
K = 3

VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, nesterov=True)),
    (AccumAdam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdamW, dict(second_moment="square_of_mean", maximize=True)),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in VARIANTS]


def run(cls, kwargs, backend, hook, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]
    opt = cls(params, lr=1e-2, accum_steps=K, backend=backend, fold_in_backward=hook, **kwargs)
    for t in range(steps):
        # Parameter i takes no part when (t + i) % 4 == 3, including on windows' last steps.
        row = [None if (t + i) % 4 == 3 else torch.randn(s, generator=gen).to(DEVICE)
               for i, s in enumerate(SHAPES)]
        sum((p * g).sum() for p, g in zip(params, row) if g is not None).backward()
        if hook:
            assert all(p.grad is None for p in params), "a gradient survived backward"
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("launch_min,stash_max", [(100, 1 << 30), (100, 10), (1, 1 << 30)],
                         ids=["launch-and-stash", "with-flushes", "launch-all"])
def test_triton_hook_mode_equals_step_mode(monkeypatch, cls, kwargs, launch_min, stash_max):
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", launch_min)
    monkeypatch.setattr(tables, "STASH_MAX_NUMEL", stash_max)
    hooked, hook_opt = run(cls, kwargs, "triton", hook=True)
    stepped, step_opt = run(cls, kwargs, "triton", hook=False)
    reference, _ = run(cls, kwargs, "torch", hook=False)
    assert (hook_opt.num_updates, hook_opt.micro_step) == (step_opt.num_updates,
                                                           step_opt.micro_step)
    for i, (a, b, r) in enumerate(zip(hooked, stepped, reference)):
        assert torch.equal(a, b), f"param {i} {tuple(a.shape)}: hook mode differs from step mode"
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} vs the torch backend: {m}")


def test_hook_launches_per_micro_step(monkeypatch):
    """Large gradients: one launch each inside backward; small ones: none until step(), whose
    two launches (fold of the stash and moves, bookkeeping) cover them all."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 1000)
    calls = []
    kernel = tables.micro_step_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append("hook" if kwargs["HOOK"] else "step")
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(tables, "micro_step_kernel", Counting())
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
    opt = AccumAdamW(params, accum_steps=2, backend="triton", fold_in_backward=True)
    large = sum(p.numel() >= 1000 for p in params)
    for _ in range(2):
        calls.clear()
        sum(p.sum() for p in params).backward()
        assert calls == ["hook"] * large
        opt.step()
        assert calls == ["hook"] * large + ["step"]
