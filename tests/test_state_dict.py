"""state_dict round-trips at any micro-step bit for bit, and interchanges with torch.optim at
window boundaries, both ways."""
import io

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumLion, AccumSGDM, AccumTiger
from reference import make_problem, su_mean_of_squares, window_gradient, windows_of

VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, nesterov=True)),
    (AccumSGDM, dict(momentum=0.0)),
    (AccumAdam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdam, dict(second_moment="square_of_mean", weight_decay=0.1)),
    (AccumAdamW, dict(second_moment="square_of_mean", amsgrad=True)),
    (AccumAdamW, dict()),
    (AccumTiger, dict(weight_decay=0.1)),
    (AccumTiger, dict(lr_scale="row_rms")),
    (AccumLion, dict(weight_decay=0.1)),
]
IDS = [f"{cls.__name__}-{kw}" for cls, kw in VARIANTS]
K = 3


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def feed(opt, params, rows):
    for row in rows:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_resume_at_every_micro_step_is_bitwise(cls, kwargs):
    init, schedule = make_problem(7, [(3, 2), (4,)], K, 3, missing=0.3, dtype=torch.float32)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, accum_steps=K, **kwargs)
    feed(opt, params, schedule)
    for cut in range(1, len(schedule)):
        first = [torch.nn.Parameter(p.clone()) for p in init]
        opt1 = cls(first, accum_steps=K, **kwargs)
        feed(opt1, first, schedule[:cut])
        saved, saved_params = roundtrip(opt1.state_dict()), [p.detach().clone() for p in first]
        resumed = [torch.nn.Parameter(p) for p in saved_params]
        opt2 = cls(resumed, accum_steps=K, **kwargs)
        opt2.load_state_dict(saved)
        assert opt2.micro_step == cut % K and opt2.num_updates == cut // K
        feed(opt2, resumed, schedule[cut:])
        for i, (a, b) in enumerate(zip(resumed, params)):
            assert torch.equal(a, b), f"resumed after micro-step {cut}: param {i} differs"
        assert opt2.num_updates == opt.num_updates


INTERCHANGE = [
    (torch.optim.SGD, AccumSGDM, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    (torch.optim.SGD, AccumSGDM, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, AccumAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1,
                                       second_moment="square_of_mean")),
    (torch.optim.AdamW, AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean")),
    (torch.optim.Adam, AccumAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1,
                                       second_moment="mean_of_squares")),
    (torch.optim.AdamW, AccumAdamW, dict(lr=1e-2, second_moment="mean_of_squares")),
]


@pytest.mark.parametrize("torch_cls,accum_cls,kwargs", INTERCHANGE,
                         ids=[f"{t.__name__}-{kw}" for t, _, kw in INTERCHANGE])
def test_torch_state_dict_loads_at_boundary_and_back(torch_cls, accum_cls, kwargs):
    """torch.optim runs windows 0-1; its state_dict loads into the accumopt optimizer at the
    boundary (keeping accum_steps, which torch's dict lacks), which runs window 2; its
    state_dict loads back into torch.optim for window 3. The reference runs window 2 with
    torch.optim on Ḡ, or with Su's rule written out for mean_of_squares."""
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "second_moment"}
    init, schedule = make_problem(3, [(5,), (2, 2)], K, 4, missing=0.2)
    windows = windows_of(schedule, K)

    def torch_windows(opt, params, some):
        for window in some:
            for i, p in enumerate(params):
                p.grad = window_gradient(window, i, "mean")
            opt.step()

    params = [torch.nn.Parameter(p.clone()) for p in init]
    topt = torch_cls(params, **torch_kwargs)
    torch_windows(topt, params, windows[:2])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_opt = torch_cls(ref, **torch_kwargs)
    ref_opt.load_state_dict(topt.state_dict())

    aopt = accum_cls(params, accum_steps=K, **kwargs)
    aopt.load_state_dict(roundtrip(topt.state_dict()))
    assert all(g["accum_steps"] == K for g in aopt.param_groups)
    assert all(g["second_moment"] == kwargs["second_moment"] for g in aopt.param_groups
               if "second_moment" in kwargs)
    feed(aopt, params, windows[2])
    assert aopt.num_updates == 1

    if kwargs.get("second_moment") == "mean_of_squares":
        states = [ref_opt.state[p] for p in ref]
        start = ([p.detach() for p in ref], [s["exp_avg"] for s in states],
                 [s["exp_avg_sq"] for s in states],
                 [s.get("max_exp_avg_sq", torch.zeros_like(s["exp_avg"])) for s in states],
                 [int(s["step"]) for s in states])
        rule = {k: v for k, v in torch_kwargs.items() if k in ("lr", "weight_decay", "amsgrad")}
        theta, m, v = su_mean_of_squares(
            init, windows[2], K, betas=(0.9, 0.999), eps=1e-8, maximize=False,
            decoupled_weight_decay=torch_cls is torch.optim.AdamW, start=start,
            **{"weight_decay": 1e-2 if torch_cls is torch.optim.AdamW else 0.0,
               "amsgrad": False, **rule})[-1]
        with torch.no_grad():
            for p, t, s, mi, vi in zip(ref, theta, states, m, v):
                p.copy_(t)
                s["exp_avg"].copy_(mi)
                s["exp_avg_sq"].copy_(vi)
                if "max_exp_avg_sq" in s:
                    torch.maximum(s["max_exp_avg_sq"], vi, out=s["max_exp_avg_sq"])
                s["step"] += 1
        for i, (a, b) in enumerate(zip(params, ref)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda msg: f"param {i} after window 2: {msg}")
    else:
        torch_windows(ref_opt, ref, windows[2:3])

    topt2 = torch_cls(params, **torch_kwargs)
    topt2.load_state_dict(roundtrip(aopt.state_dict()))
    torch_windows(topt2, params, windows[3:])
    torch_windows(ref_opt, ref, windows[3:])
    for i, (a, b) in enumerate(zip(params, ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12,
                                   msg=lambda msg: f"param {i} after the round trip: {msg}")


def test_state_dict_keys_are_the_same_at_every_window_position():
    """torch's keys plus accumopt's window keys, from the first fold on, at every micro-step
    (torch.distributed.checkpoint loads into a template built at another position)."""
    init, schedule = make_problem(0, [(3,)], K, 2, 0.0)
    for cls, kwargs, keys in [
        (AccumSGDM, dict(momentum=0.9), {"momentum_buffer", "momentum_fresh", "window_folds"}),
        (AccumSGDM, dict(momentum=0.9, nesterov=True),
         {"momentum_buffer", "momentum_fresh", "window_folds", "grad_accum"}),
        (AccumSGDM, dict(momentum=0.0), {"momentum_buffer", "window_folds", "grad_accum"}),
        (AccumAdam, dict(second_moment="square_of_mean", amsgrad=True),
         {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "window_folds", "grad_accum"}),
        (AccumAdamW, {}, {"step", "exp_avg", "exp_avg_sq", "window_folds"}),
        (AccumTiger, {}, {"exp_avg", "window_folds"}),
        (AccumLion, {}, {"exp_avg", "grad_accum", "window_folds"}),
    ]:
        params = [torch.nn.Parameter(init[0].clone())]
        opt = cls(params, accum_steps=K, **kwargs)
        for t, row in enumerate(schedule):
            params[0].grad = row[0]
            opt.step()
            got = set(opt.state_dict()["state"][0])
            assert got == keys, (cls.__name__, kwargs, t, got)


def test_load_rejects_a_window_position_outside_its_window():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumAdam([p], accum_steps=2)
    sd = opt.state_dict()
    sd["accum"] = {"micro_step": 5, "window_accum_steps": 2, "num_updates": 0}
    with pytest.raises(ValueError, match="micro_step"):
        opt.load_state_dict(sd)
    assert opt.micro_step == 0
