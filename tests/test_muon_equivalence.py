"""AccumMuon equals torch.optim.Muon itself stepped once per window with the window gradient,
for every option (nesterov, ns_steps, ns_coefficients, adjust_lr_fn, weight decay), Newton–Schulz
being torch's own bf16 computation; 2-D parameters only."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import AccumMuon
from reference import assert_close_snapshots, make_problem, run_accum, run_torch_on_mean

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="torch.optim.Muon needs torch >= 2.9")

muon_problem = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "shapes": st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
    "accum_steps": st.integers(1, 6),
    "windows": st.integers(1, 3),
    "missing": st.sampled_from([0.0, 0.0, 0.3]),
})
muon_flags = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-2, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "momentum": st.sampled_from([0.95, 0.5, 0.0]),
    "nesterov": st.booleans(),
    "ns_coefficients": st.sampled_from([(3.4445, -4.775, 2.0315), (2.0, -1.5, 0.5)]),
    "ns_steps": st.sampled_from([5, 1, 0]),
    "adjust_lr_fn": st.sampled_from([None, "original", "match_rms_adamw"]),
    "eps": st.sampled_from([1e-7, 1e-3]),
})


@given(problem=muon_problem, flags=muon_flags, reduction=st.sampled_from(["mean", "sum"]))
def test_muon_equals_torch_muon_on_the_window_gradient(problem, flags, reduction):
    init, schedule = make_problem(**problem)
    k = problem["accum_steps"]
    got = run_accum(AccumMuon, init, schedule, k, accum_reduction=reduction, **flags)
    want = run_torch_on_mean(torch.optim.Muon, init, schedule, k, reduction, **flags)
    assert_close_snapshots(got, want, ["momentum_buffer"], f"AccumMuon {flags} {reduction}",
                           rtol=1e-7, atol=1e-9)


def test_muon_nesterov_false_keeps_no_buffer_beside_the_momentum():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = AccumMuon([p], nesterov=False, accum_steps=4)
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    tensors = {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert tensors == {"momentum_buffer"}, sorted(tensors)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
def test_muon_refuses_parameters_that_are_not_matrices(shape):
    with pytest.raises(ValueError, match="2D"):
        AccumMuon([torch.nn.Parameter(torch.randn(shape))])


@pytest.mark.parametrize("bad, message", [
    (dict(nesterov=False, max_grad_norm=1.0), "max_grad_norm"),
    (dict(adjust_lr_fn="rms"), "adjust_lr_fn"), (dict(ns_steps=100), "ns_steps"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"), (dict(momentum=-0.5), "momentum"),
])
def test_bad_arguments_name_the_argument(bad, message):
    with pytest.raises(ValueError, match=message):
        AccumMuon([torch.nn.Parameter(torch.randn(2, 2))], **bad)
