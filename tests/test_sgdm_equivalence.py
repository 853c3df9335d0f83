"""AccumSGDM after every window equals torch.optim.SGD stepped once with the window gradient."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import AccumSGDM
from reference import (assert_close_snapshots, make_problem, problem_strategy, run_accum,
                       run_torch_on_mean)

sgd_flags = st.fixed_dictionaries({
    "lr": st.sampled_from([0.1, 0.03]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": st.sampled_from([0.0, 0.3]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "nesterov": st.booleans(),
    "maximize": st.booleans(),
}).filter(lambda f: not f["nesterov"] or (f["momentum"] > 0 and f["dampening"] == 0))


@given(problem=problem_strategy, flags=sgd_flags, reduction=st.sampled_from(["mean", "sum"]))
def test_sgdm_equals_torch_sgd_on_window_gradient(problem, flags, reduction):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumSGDM, init, schedule, k, accum_reduction=reduction, **flags)
    want = run_torch_on_mean(torch.optim.SGD, init, schedule, k, reduction, **flags)
    assert_close_snapshots(got, want, ["momentum_buffer"], f"AccumSGDM {flags} {reduction}")


@given(problem=problem_strategy.map(lambda p: {**p, "accum_steps": 1, "windows": 4}),
       flags=sgd_flags, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sgdm_accum_steps_1_is_torch_sgd_bitwise(problem, flags, dtype):
    init, schedule = make_problem(**problem, dtype=dtype)
    got = run_accum(AccumSGDM, init, schedule, 1, **flags)
    want = run_torch_on_mean(torch.optim.SGD, init, schedule, 1, foreach=False, **flags)
    assert_close_snapshots(got, want, ["momentum_buffer"], f"AccumSGDM k=1 {flags}",
                           rtol=0, atol=0)


def test_bufferless_sgdm_holds_no_accumulator():
    """momentum > 0 without nesterov folds straight into the buffer; the other variants keep
    one accumulator (kept between windows, so the state has the same keys throughout)."""
    init, schedule = make_problem(0, [(3,)], 4, 1, 0.0)
    for flags, holds in [({"momentum": 0.9}, False), ({"momentum": 0.9, "nesterov": True}, True),
                         ({"momentum": 0.0}, True)]:
        p = torch.nn.Parameter(init[0].clone())
        opt = AccumSGDM([p], accum_steps=4, **flags)
        for t, row in enumerate(schedule):
            p.grad = row[0]
            opt.step()
            assert ("grad_accum" in opt.state[p]) == holds, (flags, t, opt.state[p].keys())
