"""AccumLion equals Lion (the paper's update, lion-pytorch's op order) applied once per window to
the window gradient, written out in float64 (tests/reference.py); its accumulator is clipped by
max_grad_norm as clip_grad_norm_ clips .grad."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import AccumLion
from reference import (assert_close_windows, lion_on_mean, make_problem, problem_strategy,
                       run_accum, windows_of, window_gradient)

lion_flags = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-2, 1e-4]),
    "betas": st.sampled_from([(0.9, 0.99), (0.95, 0.98), (0.0, 0.5)]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "maximize": st.booleans(),
})


@given(problem=problem_strategy, flags=lion_flags, reduction=st.sampled_from(["mean", "sum"]),
       foreach=st.booleans())
def test_lion_equals_its_rule_on_the_window_gradient(problem, flags, reduction, foreach):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumLion, init, schedule, k, accum_reduction=reduction, foreach=foreach,
                    **flags)
    want = lion_on_mean(init, schedule, k, reduction, **flags)
    assert_close_windows(got, want, "exp_avg", f"AccumLion {flags} {reduction}")


@given(problem=problem_strategy.map(lambda p: {**p, "missing": 0.0}),
       max_norm=st.sampled_from([0.05, 1.0, 100.0]))
def test_lion_window_clipping_equals_clipping_the_window_gradient(problem, max_norm):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumLion, init, schedule, k, lr=1e-2, max_grad_norm=max_norm)
    clipped = []
    for window in windows_of(schedule, k):
        means = [window_gradient(window, i, "mean") for i in range(len(init))]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in means]))
        coefficient = min(1.0, max_norm / (float(norm) + 1e-6))
        clipped += [[g * coefficient for g in means]] + [[torch.zeros_like(g) for g in means]
                                                         for _ in range(k - 1)]
    # Lion on the clipped window gradient: each window's first row holds k·Ḡ_clipped / k.
    rows = [[g * k for g in row] if t % k == 0 else row for t, row in enumerate(clipped)]
    want = lion_on_mean(init, rows, k, "mean", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    assert_close_windows(got, want, "exp_avg", f"AccumLion max_grad_norm={max_norm}")


def test_bad_betas_name_the_argument():
    with pytest.raises(ValueError, match="beta"):
        AccumLion([torch.nn.Parameter(torch.randn(2))], betas=(0.9, 1.5))
