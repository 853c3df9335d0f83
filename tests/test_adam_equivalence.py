"""AccumAdam(W): square_of_mean equals torch.optim.Adam(W) on the window gradient;
mean_of_squares equals Su's rule written out; accum_steps=1 is torch.optim bit for bit."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import AccumAdam, AccumAdamW
from reference import (assert_close_snapshots, make_problem, problem_strategy, run_accum,
                       run_torch_on_mean, su_mean_of_squares)

adam_flags = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-2, 1e-3]),
    "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    "eps": st.sampled_from([1e-8, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "decoupled_weight_decay": st.booleans(),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
})
STATE_KEYS = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]

@given(problem=problem_strategy, flags=adam_flags, reduction=st.sampled_from(["mean", "sum"]))
def test_square_of_mean_equals_torch_adam_on_window_gradient(problem, flags, reduction):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumAdam, init, schedule, k, accum_reduction=reduction,
                    second_moment="square_of_mean", **flags)
    want = run_torch_on_mean(torch.optim.Adam, init, schedule, k, reduction, **flags)
    assert_close_snapshots(got, want, STATE_KEYS, f"AccumAdam square_of_mean {flags} {reduction}")

@given(problem=problem_strategy, flags=adam_flags.map(
    lambda f: {k: v for k, v in f.items() if k != "decoupled_weight_decay"}))
def test_adamw_square_of_mean_equals_torch_adamw(problem, flags):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumAdamW, init, schedule, k, second_moment="square_of_mean", **flags)
    want = run_torch_on_mean(torch.optim.AdamW, init, schedule, k, **flags)
    assert_close_snapshots(got, want, STATE_KEYS, f"AccumAdamW square_of_mean {flags}")

@given(problem=problem_strategy, flags=adam_flags, reduction=st.sampled_from(["mean", "sum"]))
def test_mean_of_squares_equals_su_rule(problem, flags, reduction):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumAdam, init, schedule, k, accum_reduction=reduction,
                    second_moment="mean_of_squares", **flags)
    want = su_mean_of_squares(init, schedule, k, reduction=reduction, **flags)
    assert len(got) == len(want)
    for w, ((params, states), (theta, m, v)) in enumerate(zip(got, want)):
        for i, p in enumerate(params):
            msg = f"mean_of_squares {flags} {reduction}: window {w}, param {i}"
            torch.testing.assert_close(p, theta[i], rtol=1e-10, atol=1e-12,
                                       msg=lambda s: f"{msg}, θ: {s}")
            if "exp_avg" in states[i]:
                torch.testing.assert_close(states[i]["exp_avg"], m[i], rtol=1e-10, atol=1e-12,
                                           msg=lambda s: f"{msg}, m: {s}")
                torch.testing.assert_close(states[i]["exp_avg_sq"], v[i], rtol=1e-10,
                                           atol=1e-12, msg=lambda s: f"{msg}, v: {s}")

@pytest.mark.parametrize("second_moment", ["mean_of_squares", "square_of_mean"])
@given(problem=problem_strategy.map(lambda p: {**p, "accum_steps": 1, "windows": 4}),
       flags=adam_flags, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_accum_steps_1_is_torch_adam_bitwise(second_moment, problem, flags, dtype):
    init, schedule = make_problem(**problem, dtype=dtype)
    got = run_accum(AccumAdam, init, schedule, 1, second_moment=second_moment, **flags)
    want = run_torch_on_mean(torch.optim.Adam, init, schedule, 1, foreach=False, **flags)
    assert_close_snapshots(got, want, STATE_KEYS, f"AccumAdam k=1 {second_moment} {flags}",
                           rtol=0, atol=0)

def test_mean_of_squares_second_moment_exceeds_square_of_mean_on_noisy_windows():
    """The documented caveat: with disagreeing micro-batches mean_t(g_t²) > Ḡ², so v is larger
    and the step smaller than standard accumulation's."""
    init, schedule = make_problem(1, [(64,)], 8, 1, 0.0)
    su = run_accum(AccumAdam, init, schedule, 8, second_moment="mean_of_squares")
    exact = run_accum(AccumAdam, init, schedule, 8, second_moment="square_of_mean")
    v_su, v_exact = su[0][1][0]["exp_avg_sq"], exact[0][1][0]["exp_avg_sq"]
    assert bool((v_su >= v_exact).all()) and bool((v_su > v_exact).any())
    step_su = (su[0][0][0] - init[0]).abs().mean()
    step_exact = (exact[0][0][0] - init[0]).abs().mean()
    assert step_su < step_exact, (step_su, step_exact)
