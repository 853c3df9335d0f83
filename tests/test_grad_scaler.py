"""GradScaler: each micro-batch is unscaled while folding; one with inf/NaN is dropped, not
folded and not counted toward the window."""
import pytest
import torch

from accumopt import AccumAdam, AccumLion, AccumSGDM, AccumTiger
from reference import make_problem, run_accum


def scaled_run(cls, init, schedule, bad, accum_steps, unscale_first=False, **kwargs):
    """A scaled backward of the loss Σ_i <θ_i, g_i>, whose gradient is the scheduled g_i, then
    GradScaler.step; micro-steps in ``bad`` get an inf in their first gradient. Returns the
    params after each update and the updated flags."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, accum_steps=accum_steps, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    flags, updates = [], []
    for t, row in enumerate(schedule):
        loss = sum((p * g).sum() for p, g in zip(params, row) if g is not None)
        scaler.scale(loss).backward()
        if t in bad:
            params[0].grad[(0,) * params[0].dim()] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        flags.append(opt.updated)
        if opt.updated:
            updates.append([p.detach().clone() for p in params])
    return updates, flags, scaler


@pytest.mark.parametrize("cls,kwargs", [(AccumAdam, dict()),
                                        (AccumAdam, dict(second_moment="square_of_mean")),
                                        (AccumSGDM, dict(momentum=0.9)),
                                        (AccumSGDM, dict(momentum=0.9, nesterov=True)),
                                        (AccumTiger, dict(lr=1e-2)),
                                        (AccumLion, dict(lr=1e-2))])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_inf_micro_batch_is_dropped_and_not_counted(cls, kwargs, unscale_first):
    k = 3
    init, schedule = make_problem(5, [(4,), (2, 3)], 1, 8, 0.0, dtype=torch.float32)
    bad = {1, 5}
    got, flags, scaler = scaled_run(cls, init, schedule, bad, k, unscale_first, **kwargs)
    # Without the two bad micro-batches the 6 good ones make two windows of 3.
    good = [row for t, row in enumerate(schedule) if t not in bad]
    want = run_accum(cls, init, good, k, **kwargs)
    assert flags == [False, False, False, True, False, False, False, True]
    assert len(got) == 2
    for w, (params, (ref_params, _)) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"window {w}, param {i}: {m}")
    # Grown x2 on each of the 6 good micro-steps, halved on each of the 2 bad ones.
    assert scaler.get_scale() == 2.0 ** (10 + 6 - 2), "the scaler did not see exactly two infs"
