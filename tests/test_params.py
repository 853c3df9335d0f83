"""Complex parameters (folded as real views, as torch.optim does) and parameters of different
dtypes in one group."""
import pytest
import torch

from accumopt import AccumAdam, AccumSGDM
from reference import make_problem, run_accum, run_torch_on_mean


@pytest.mark.parametrize("cls,torch_cls,kwargs", [
    (AccumSGDM, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (AccumSGDM, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (AccumAdam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, second_moment="square_of_mean")),
])
def test_complex_parameters_match_torch(cls, torch_cls, kwargs):
    init, schedule = make_problem(4, [(3,), (2, 2)], 2, 3, 0.2, dtype=torch.complex128)
    got = run_accum(cls, init, schedule, 2, **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "second_moment"}
    want = run_torch_on_mean(torch_cls, init, schedule, 2, **torch_kwargs)
    for (gp, _), (wp, _) in zip(got, want):
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_complex_mean_of_squares_with_accum_steps_1_is_torch_adam():
    init, schedule = make_problem(4, [(3,)], 1, 4, 0.0, dtype=torch.complex64)
    got = run_accum(AccumAdam, init, schedule, 1)
    want = run_torch_on_mean(torch.optim.Adam, init, schedule, 1, foreach=False)
    for (gp, _), (wp, _) in zip(got, want):
        assert torch.equal(gp[0], wp[0])


@pytest.mark.parametrize("cls,torch_cls,kwargs", [
    (AccumSGDM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (AccumAdam, torch.optim.Adam, dict(lr=1e-2, second_moment="square_of_mean")),
])
def test_mixed_dtypes_in_one_group(cls, torch_cls, kwargs):
    init64, schedule64 = make_problem(6, [(3,), (4,), (2,)], 3, 2, 0.2)
    to32 = lambda t: None if t is None else t.float()
    init = [init64[0], init64[1].float(), init64[2].to(torch.bfloat16)]
    schedule = [[row[0], to32(row[1]), None if row[2] is None else row[2].to(torch.bfloat16)]
                for row in schedule64]
    got = run_accum(cls, init, schedule, 3, **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "second_moment"}
    want = run_torch_on_mean(torch_cls, init, schedule, 3, **torch_kwargs)
    for (gp, _), (wp, _) in zip(got, want):
        for a, b, tol in zip(gp, wp, (1e-12, 1e-6, 2e-2)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
