"""What a port from torch.optim hits first: torch's constructor flags with torch's meaning,
a Tensor lr (and Tensor betas, eps, weight_decay), AccumAdam's positional amsgrad, param group
keys that stay put through load_state_dict and copies, copies of a state holding more than
parameters' entries, state-dict hooks that see the window, torch's errors for a set of params
or fused with foreach, and sparse gradients refused with an error a user can act on."""
import copy
import functools
import pickle

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumLion, AccumMuon, AccumSGDM, AccumTiger
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


def test_one_element_tensor_hyperparameters_step_as_their_values():
    """torch.optim.Adam takes Tensor betas of any one-element shape (its own test inputs use
    (1, 1, 1) and (1, 1)); every accumopt hyperparameter of that kind acts as its value. The
    reference: torch.optim.Adam with the same values as floats (accum_steps=1 is Adam)."""
    init, schedule = make_problem(7, [(4, 3), (5,)], 1, 4, missing=0.0)
    T = torch.tensor
    got, _ = run(AccumAdam, init, schedule, k=1, betas=(T([[[0.9]]]), T([[0.99]])),
                 eps=T([[[1e-6]]]), weight_decay=T([0.1]))
    params = [torch.nn.Parameter(p.clone()) for p in init]
    ref = torch.optim.Adam(params, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    for row in schedule:
        for p, g in zip(params, row):
            p.grad = g
        ref.step()
    for i, (a, b) in enumerate(zip(got, params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"param {i} vs torch.optim.Adam: {m}")
    # The families without a torch twin: the same optimizer with the values as floats (float64
    # tensors, which hold the floats exactly).
    T = functools.partial(torch.tensor, dtype=torch.float64)
    for cls, tensors, floats in [
            (AccumLion, dict(betas=(T([[0.9]]), T(0.99)), weight_decay=T([[[0.1]]])),
             dict(betas=(0.9, 0.99), weight_decay=0.1)),
            (AccumTiger, dict(beta=T([[[0.9]]])), dict(beta=0.9))]:
        a, _ = run(cls, init, schedule, k=2, **tensors)
        b, _ = run(cls, init, schedule, k=2, **floats)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), cls.__name__


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_an_entry_a_hook_put_in_state(how):
    """torch's own load_state_dict post-hook test keeps a flag in ``optimizer.state``; a copy
    of an accumopt optimizer (mid-window) carries it and trains on as the original does."""
    init, schedule = make_problem(8, [(3,)], 1, 3, missing=0.0)
    _, opt = run(AccumAdamW, init, schedule[:1], k=2)
    opt.state["ran_load_state_dict_post_hook"] = True
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.state["ran_load_state_dict_post_hook"] is True
    for o in (opt, clone):
        for p, g in zip(o.param_groups[0]["params"], schedule[1]):
            p.grad = g.clone()
        o.step()
    assert opt.num_updates == clone.num_updates == 1
    assert torch.equal(opt.param_groups[0]["params"][0], clone.param_groups[0]["params"][0])


@pytest.mark.parametrize("cls,kwargs", CLASSES + [(AccumMuon, {})],
                         ids=lambda c: getattr(c, "__name__", ""))
def test_copies_keep_the_defaults_and_group_keys(cls, kwargs):
    """A deepcopy or pickle has the original's keys, in defaults and every group, no more
    (torch's Optimizer.__setstate__ adds ``differentiable`` where a class lacks it)."""
    opt = cls([torch.nn.Parameter(torch.randn(3, 2))], backend="torch", **kwargs)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert set(clone.defaults) == set(opt.defaults)
        assert [set(g) for g in clone.param_groups] == [set(g) for g in opt.param_groups]


@pytest.mark.parametrize("cls", [AccumAdam, AccumSGDM, AccumMuon])
def test_add_param_group_refuses_a_set_as_torch_does(cls):
    opt = cls([torch.nn.Parameter(torch.randn(3, 2))], backend="torch")
    with pytest.raises(TypeError, match="ordered collections"):
        torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))]).add_param_group(
            {"params": {torch.nn.Parameter(torch.randn(3, 2))}})
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {torch.nn.Parameter(torch.randn(3, 2))}})
    assert len(opt.param_groups) == 1


def test_fused_and_foreach_together_is_torchs_error():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        AccumAdam([torch.nn.Parameter(torch.randn(3))], fused=True, foreach=True)


def _torch_takes_named_parameters():
    try:
        torch.optim.SGD([("w", torch.nn.Parameter(torch.zeros(1)))])
    except (TypeError, ValueError):
        return False       # (torch < 2.6)
    return True


@pytest.mark.skipif(not _torch_takes_named_parameters(),
                    reason="this torch.optim takes no named parameters")
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_RUNS else []))
@pytest.mark.parametrize("hook", [False, True], ids=["step-mode", "fold_in_backward"])
def test_named_parameters_as_torch_optim_takes_them(backend, hook):
    """``model.named_parameters()`` (torch's named form): the same steps and the same
    ``param_names`` in state_dict as torch.optim.Adam given them (accum_steps=1 is Adam)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    opt = AccumAdam(model.named_parameters(), lr=1e-2, fold_in_backward=hook, backend=backend)
    ref = torch.optim.Adam(twin.named_parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        x = torch.randn(5, 3)
        for m, o in ((model, opt), (twin, ref)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert opt.state_dict()["param_groups"][0]["param_names"] == \
        ref.state_dict()["param_groups"][0]["param_names"]
    opt.remove_hooks()


@pytest.mark.skipif(not _torch_takes_named_parameters(),
                    reason="this torch.optim takes no named parameters")
def test_muon_checks_named_parameters_too():
    with pytest.raises(ValueError, match="2D"):
        AccumMuon([("bias", torch.nn.Parameter(torch.randn(3)))])


@pytest.mark.parametrize("cls,group,kwargs", [
    (AccumAdam, {"second_moment": "square_of_mean"}, dict(max_grad_norm=1.0)),
    (AccumSGDM, {"momentum": 0.0}, dict(max_grad_norm=1.0)),
    (AccumSGDM, {"momentum": 0.9, "dampening": 0.0}, dict(nesterov=True, momentum=0.0)),
])
def test_a_param_group_may_override_what_the_defaults_alone_would_refuse(cls, group, kwargs):
    """The defaults are checked before params only where they are the one group's values; a
    param group dict that overrides them is checked with its own (as before this check)."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = cls([{"params": [p], **group}], backend="torch", **kwargs)
    assert all(opt.param_groups[0][k] == v for k, v in group.items())
    with pytest.raises(ValueError):
        cls([p], backend="torch", **kwargs)
