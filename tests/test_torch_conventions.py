"""What a port from torch.optim hits first: torch's constructor flags with torch's meaning,
a Tensor lr, AccumAdam's positional amsgrad, param group keys that stay put through
load_state_dict and deepcopy, state-dict hooks that see the window, and sparse gradients
refused with an error a user can act on."""
import copy

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumLion, AccumSGDM, AccumTiger
from reference import make_problem
from triton_device import TRITON_RUNS

CLASSES = [(AccumSGDM, dict(momentum=0.9)), (AccumAdam, {}), (AccumAdamW, {}),
           (AccumTiger, dict(weight_decay=0.1)), (AccumLion, dict(weight_decay=0.1))]


def run(cls, init, schedule, k=2, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, accum_steps=k, backend="torch", **kwargs)
    for row in schedule:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_torch_flags_are_accepted_at_their_defaults_and_kept_in_defaults(cls, kwargs):
    p = torch.nn.Parameter(torch.ones(2))
    opt = cls([p], foreach=None, fused=None, differentiable=False, capturable=False, **kwargs)
    for key in ("foreach", "fused", "differentiable", "capturable"):
        assert key in opt.defaults and key in opt.param_groups[0], key
    cls([p], foreach=False, fused=False, **kwargs)


@pytest.mark.parametrize("flag,value", [("capturable", True), ("differentiable", True),
                                        ("foreach", "yes"), ("fused", 1)])
def test_unsupported_torch_flags_raise_naming_them(flag, value):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=flag):
        AccumAdamW([p], **{flag: value})


def test_fused_asks_for_the_kernels():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="fused"):
        AccumAdamW([p], fused=True, backend="torch")
    if TRITON_RUNS:
        opt = AccumAdamW([p], fused=True)
        p.grad = torch.ones(2)
        opt.step()
        assert opt._device_windows, "fused=True did not run the Triton kernels"


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_foreach_true_and_false_agree_bit_for_bit(cls, kwargs):
    init, schedule = make_problem(3, [(3, 2), (4,)], 1, 6, missing=0.2)
    a, _ = run(cls, init, schedule, foreach=True, **kwargs)
    b, _ = run(cls, init, schedule, foreach=False, **kwargs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_a_tensor_lr_of_any_one_element_shape(cls, kwargs, shape):
    init, schedule = make_problem(4, [(3,)], 1, 4, missing=0.0)
    want, _ = run(cls, init, schedule, lr=0.05, **kwargs)
    got, opt = run(cls, init, schedule, lr=torch.full(shape, 0.05, dtype=torch.float64),
                   **kwargs)
    for x, y in zip(got, want):
        assert torch.equal(x, y), f"lr of shape {shape}"
    assert torch.is_tensor(opt.param_groups[0]["lr"])


def test_amsgrad_is_positional_as_in_torch_optim_adam():
    p = torch.nn.Parameter(torch.ones(2))
    for cls in (AccumAdam, AccumAdamW):
        opt = cls([p], 1e-3, (0.9, 0.999), 1e-8, 0.0, True)
        assert opt.param_groups[0]["amsgrad"] is True, cls.__name__
        opt = torch.optim.Adam([p], 1e-3, (0.9, 0.999), 1e-8, 0.0, True)
        assert opt.param_groups[0]["amsgrad"] is True


@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_param_group_keys_survive_load_state_dict_and_deepcopy(cls, kwargs):
    init, schedule = make_problem(5, [(3,)], 1, 3, missing=0.0)
    _, opt = run(cls, init, schedule, **kwargs)
    keys = [set(g) for g in opt.param_groups]
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert [set(g) for g in opt.param_groups] == keys, "load_state_dict changed the keys"
    assert opt.state_dict()["param_groups"] == sd["param_groups"]
    clone = copy.deepcopy(opt)
    assert [set(g) for g in clone.param_groups] == keys, "deepcopy changed the keys"


def test_state_dict_hooks_see_the_window_position():
    init, schedule = make_problem(6, [(3,)], 1, 1, missing=0.0)
    _, opt = run(AccumAdamW, init, schedule, k=3)
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(sd.get("accum", {})))
    sd = opt.state_dict()
    assert seen["micro_step"] == 1 and sd["accum"]["micro_step"] == 1

    def restart_window(optimizer, state_dict):
        state_dict["accum"] = dict(state_dict["accum"], micro_step=2)
        return state_dict
    opt.register_load_state_dict_pre_hook(restart_window)
    opt.load_state_dict(copy.deepcopy(sd))
    assert opt.micro_step == 2, "a load pre hook's change to the window position was ignored"


@pytest.mark.parametrize("hook", [False, True])
def test_sparse_gradients_are_refused_saying_what_to_do_and_change_nothing(hook):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = AccumSGDM(emb.parameters(), lr=0.1, accum_steps=2, fold_in_backward=hook)
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse") as err:
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
    assert "sparse=False" in str(err.value)
    assert torch.equal(emb.weight, before) and opt.micro_step == 0 and not opt.state
