"""AccumTiger equals Tiger's rule applied once per window to the window gradient (written out in
float64, tests/reference.py), for every lr_scale; tiger_param_groups picks bojone/tiger's
scales; window clipping is refused."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import AccumTiger, tiger_param_groups
from reference import (assert_close_windows, make_problem, problem_strategy, run_accum,
                       tiger_on_mean)

tiger_flags = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-2, 1e-3]),
    "beta": st.sampled_from([0.965, 0.9, 0.0]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.5]),
    "lr_scale": st.sampled_from(["rms", "row_rms", "half", None]),
    "maximize": st.booleans(),
})


@given(problem=problem_strategy, flags=tiger_flags, reduction=st.sampled_from(["mean", "sum"]),
       foreach=st.booleans())
def test_tiger_equals_its_rule_on_the_window_gradient(problem, flags, reduction, foreach):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumTiger, init, schedule, k, accum_reduction=reduction, foreach=foreach,
                    **flags)
    want = tiger_on_mean(init, schedule, k, reduction, **flags)
    assert_close_windows(got, want, "exp_avg", f"AccumTiger {flags} {reduction}")


def test_tiger_keeps_no_buffer_beside_its_momentum():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = AccumTiger([p], accum_steps=4)
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    tensors = {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert tensors == {"exp_avg"}, f"Tiger's state holds {sorted(tensors)}, not just exp_avg"


def test_tiger_param_groups_follow_bojone_scales():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4),
                                torch.nn.LayerNorm(4), torch.nn.Linear(4, 10, bias=False))
    model[3].weight = model[0].weight      # tied: listed once
    groups = tiger_param_groups(model, weight_decay=0.1)
    by_scale = {g["lr_scale"]: g["params"] for g in groups}
    assert [id(p) for p in by_scale["row_rms"]] == [id(model[0].weight)]
    assert [id(p) for p in by_scale["rms"]] == [id(model[1].weight)]
    assert {id(p) for p in by_scale["half"]} == {id(model[1].bias), id(model[2].weight),
                                                 id(model[2].bias)}
    assert all(g["weight_decay"] == 0.1 for g in groups)
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    AccumTiger(groups, accum_steps=2)   # the groups build an optimizer


def test_half_groups_never_decay():
    """lr_scale="half" (biases and norm gains): η = lr/2 and λ = 0 whatever weight_decay."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = AccumTiger([{"params": [p], "lr_scale": "half"}], lr=0.1, weight_decay=0.5,
                     accum_steps=1)
    p.grad = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -2.0, 3.05],
                                                        dtype=torch.float64))


@pytest.mark.parametrize("bad, message", [
    (dict(max_grad_norm=1.0), "max_grad_norm"), (dict(lr_scale="rows"), "lr_scale"),
    (dict(beta=1.0), "beta"), (dict(lr=-1.0), "lr"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_arguments_name_the_argument(bad, message):
    with pytest.raises(ValueError, match=message):
        AccumTiger([torch.nn.Parameter(torch.randn(2, 2))], **bad)
