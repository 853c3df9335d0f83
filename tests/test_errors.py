"""Every bad input the contract lists gets a clear error naming the argument, and changes
nothing."""
import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumSGDM


def param():
    return torch.nn.Parameter(torch.ones(3))


BAD_CONSTRUCTIONS = [
    (AccumSGDM, dict(lr=-1.0), "lr"),
    (AccumAdam, dict(lr=-1e-3), "lr"),
    (AccumAdam, dict(lr=float("nan")), "lr"),
    (AccumAdam, dict(betas=(1.0, 0.999)), "beta1"),
    (AccumAdam, dict(betas=(0.9, -0.1)), "beta2"),
    (AccumAdamW, dict(betas=(0.9,)), "betas"),
    (AccumAdam, dict(eps=-1e-8), "eps"),
    (AccumAdam, dict(weight_decay=-0.1), "weight_decay"),
    (AccumSGDM, dict(momentum=-0.5), "momentum"),
    (AccumSGDM, dict(accum_steps=0), "accum_steps"),
    (AccumAdam, dict(accum_steps=2.0), "accum_steps"),
    (AccumAdam, dict(accum_steps=True), "accum_steps"),
    (AccumAdam, dict(accum_steps=-3), "accum_steps"),
    (AccumAdam, dict(second_moment="mean"), "second_moment"),
    (AccumAdamW, dict(backend="cuda"), "backend"),
    (AccumSGDM, dict(accum_reduction="max"), "accum_reduction"),
    (AccumSGDM, dict(momentum=0.0, nesterov=True), "nesterov"),
    (AccumSGDM, dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (AccumAdam, dict(amsgrad="yes"), "amsgrad"),
    (AccumSGDM, dict(fold_in_backward=1), "fold_in_backward"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD_CONSTRUCTIONS,
                         ids=[f"{c.__name__}-{kw}" for c, kw, _ in BAD_CONSTRUCTIONS])
def test_bad_constructor_argument_names_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([param()], **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton can run on CUDA tensors here")
def test_triton_backend_where_triton_cannot_run(monkeypatch):
    """CPU tensors without the interpreter: a clear error naming backend."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend"):
        AccumAdam([param()], backend="triton")


@pytest.mark.parametrize("cls", [AccumSGDM, AccumAdam])
def test_bad_param_group_is_not_added(cls):
    opt = cls([param()])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [param()], "lr": -1.0})
    assert len(opt.param_groups) == 1


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in opt.state.items()},
            opt.micro_step, opt.num_updates)


def assert_unchanged(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "parameters changed"
    assert before[1].keys() == after[1].keys(), "state entries changed"
    for pid, state in before[1].items():
        assert state.keys() == after[1][pid].keys(), "state keys changed"
        for key, value in state.items():
            other = after[1][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert before[2:] == after[2:], "window position changed"


@pytest.mark.parametrize("cls", [AccumSGDM, AccumAdam])
def test_sparse_gradient_is_refused_and_changes_nothing(cls):
    dense, other = param(), param()
    opt = cls([dense, other], lr=0.1, accum_steps=2)
    dense.grad = torch.ones(3)
    other.grad = torch.ones(3)
    opt.step()
    before = snapshot([dense, other], opt)
    dense.grad = torch.ones(3)
    other.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(before, snapshot([dense, other], opt))


def test_accum_steps_set_bad_between_windows_is_refused_and_changes_nothing():
    a, b = param(), param()
    opt = AccumAdam([{"params": [a]}, {"params": [b]}], accum_steps=2)
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.step()
    before = snapshot([a, b], opt)
    opt.param_groups[1]["accum_steps"] = 4
    with pytest.raises(ValueError, match="accum_steps"):
        opt.step()
    opt.param_groups[1]["accum_steps"] = 0
    with pytest.raises(ValueError, match="accum_steps"):
        opt.step()
    assert_unchanged(before, snapshot([a, b], opt))


def test_process_group_without_torch_distributed_names_it():
    with pytest.raises(ValueError, match="process_group"):
        AccumAdam([param()], process_group=object())
