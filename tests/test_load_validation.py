"""load_state_dict checks every value as the constructor does and is all-or-nothing; the
runtime options come from the constructor, never from the checkpoint; AccumAdamW stays
decoupled whatever it loads."""
import copy

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import TRITON_RUNS


def trained(cls=AccumAdam, steps=2, **kwargs):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 4))
    opt = cls([p], lr=0.1, accum_steps=3, backend="torch", **kwargs)
    for t in range(steps):
        p.grad = torch.full((4,), 0.1 * (t + 1))
        opt.step()
    return p, opt


def snapshot(p, opt):
    sd = opt.state_dict()
    return (p.detach().clone(), copy.deepcopy(sd), opt.micro_step, opt.num_updates)


def assert_unchanged(before, p, opt, what):
    p0, sd0, micro_step, num_updates = before
    assert torch.equal(p0, p.detach()), f"{what}: the parameter changed"
    assert (opt.micro_step, opt.num_updates) == (micro_step, num_updates), \
        f"{what}: the window position changed"
    sd = opt.state_dict()
    assert sd["param_groups"] == sd0["param_groups"], f"{what}: the param groups changed"
    for key, entry in sd0["state"].items():
        for name, value in entry.items():
            got = sd["state"][key][name]
            same = torch.equal(got, value) if torch.is_tensor(value) else got == value
            assert same, f"{what}: state {key}/{name} changed"


def group_change(key, value):
    def change(sd):
        sd["param_groups"][0][key] = value
    return change


def accum_change(key, value):
    def change(sd):
        sd["accum"][key] = value
    return change


def state_change(key, value):
    def change(sd):
        sd["state"][0][key] = value
    return change


def drop(*path):
    def change(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


BAD = [
    ("micro_step=1.5", accum_change("micro_step", 1.5), "micro_step"),
    ("micro_step=-1", accum_change("micro_step", -1), "micro_step"),
    ("micro_step beyond window", accum_change("micro_step", 7), "micro_step"),
    ("micro_step=True", accum_change("micro_step", True), "micro_step"),
    ("window_accum_steps=0", accum_change("window_accum_steps", 0), "accum_steps"),
    ("num_updates=-2", accum_change("num_updates", -2), "num_updates"),
    ("accum without micro_step", drop("accum", "micro_step"), "micro_step"),
    ("accum a list", lambda sd: sd.__setitem__("accum", [1, 3, 0]), "accum"),
    ("lr=-1", group_change("lr", -1.0), "lr"),
    ("accum_steps=0", group_change("accum_steps", 0), "accum_steps"),
    ("accum_steps=2.0", group_change("accum_steps", 2.0), "accum_steps"),
    ("betas>1", group_change("betas", (0.9, 1.5)), "beta2"),
    ("eps<0", group_change("eps", -1e-8), "eps"),
    ("second_moment", group_change("second_moment", "median"), "second_moment"),
    ("accum_reduction", group_change("accum_reduction", "max"), "accum_reduction"),
    ("weight_decay nan", group_change("weight_decay", float("nan")), "weight_decay"),
    ("amsgrad 'yes'", group_change("amsgrad", "yes"), "amsgrad"),
    ("no param_groups", drop("param_groups"), "param_groups"),
    ("no state", drop("state"), "state"),
    ("exp_avg_sq missing", drop("state", 0, "exp_avg_sq"), "exp_avg"),
    ("exp_avg wrong shape", state_change("exp_avg", torch.zeros(5)), "exp_avg"),
    ("step negative", state_change("step", torch.tensor(-1.0)), "step"),
    ("step fractional", state_change("step", 1.5), "step"),
    ("window_folds 1.0", state_change("window_folds", 1.0), "window_folds"),
    ("window_folds too many", state_change("window_folds", 9), "window_folds"),
    ("hyper_read a dict", accum_change("hyper_read", {"lr": 0.1}), "hyper_read"),
    ("hyper_read too long", accum_change("hyper_read", [None, None]), "hyper_read"),
    ("hyper_read other keys", accum_change("hyper_read", [{"lr": 0.1}]), "hyper_read"),
    ("hyper_read a tensor", accum_change("hyper_read", [{"lr": torch.tensor(0.1)}]),
     "hyper_read"),
]


@pytest.mark.parametrize("name,change,word", BAD, ids=[b[0] for b in BAD])
def test_bad_state_dict_raises_naming_it_and_changes_nothing(name, change, word):
    p, opt = trained()
    before = snapshot(p, opt)
    bad = copy.deepcopy(opt.state_dict())
    change(bad)
    with pytest.raises(ValueError, match=word):
        opt.load_state_dict(bad)
    assert_unchanged(before, p, opt, name)
    # The optimizer still runs: the window goes on where it was.
    p.grad = torch.full((4,), 0.3)
    opt.step()
    assert opt.updated and opt.num_updates == 1


def test_a_bad_group_after_good_ones_changes_nothing():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([{"params": [a]}, {"params": [b]}], lr=0.1, accum_steps=2)
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.5
    sd["param_groups"][1]["momentum"] = -0.5
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1, "the good first group was installed"


def test_runtime_options_come_from_the_constructor():
    p = torch.nn.Parameter(torch.ones(3))
    hooked = AccumAdamW([p], accum_steps=2, fold_in_backward=True, backend="torch")
    sd = copy.deepcopy(hooked.state_dict())
    hooked.remove_hooks()
    sd["param_groups"][0].update(backend="triton", fold_in_backward=False, fused=True,
                                 foreach=True)
    q = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdamW([q], accum_steps=2, fold_in_backward=True, backend="torch")
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert (group["backend"], group["fold_in_backward"], group["fused"], group["foreach"]) == \
        ("torch", True, None, None)
    (q * 2).sum().backward()
    assert q.grad is None, "the checkpoint's fold_in_backward=False turned the hooks off"


@pytest.mark.parametrize("source", ["torch.optim.Adam", "AccumAdam"])
def test_adamw_stays_decoupled_whatever_it_loads(source):
    p = torch.nn.Parameter(torch.ones(3))
    if source == "torch.optim.Adam":
        other = torch.optim.Adam([p], lr=0.1, weight_decay=0.5)
    else:
        other = AccumAdam([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.ones(3)
    other.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt = AccumAdamW([q], lr=0.1, weight_decay=0.5)
    # Deep copies: a loaded state_dict shares its tensors with the live optimizer, as in torch.
    opt.load_state_dict(copy.deepcopy(other.state_dict()))
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=0.1, weight_decay=0.5)
    ref.load_state_dict(copy.deepcopy(other.state_dict()))
    for param, o in ((q, opt), (ref_p, ref)):
        param.grad = torch.full((3,), 0.2)
        o.step()
    torch.testing.assert_close(q, ref_p, rtol=0, atol=0)


def test_a_plain_number_step_loads_like_torch_optim():
    p, opt = trained(steps=3)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = 1  # older torch checkpoints keep a number
    q = torch.nn.Parameter(p.detach().clone())
    fresh = AccumAdam([q], lr=0.1, accum_steps=3, backend="torch")
    fresh.load_state_dict(sd)
    for param, o in ((p, opt), (q, fresh)):
        for t in range(3):
            param.grad = torch.full((4,), 0.2)
            o.step()
    assert torch.equal(p, q)
    assert torch.is_tensor(fresh.state[q]["step"]) and float(fresh.state[q]["step"]) == 2.0


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
def test_triton_checkpoint_loads_on_the_torch_backend():
    p = torch.nn.Parameter(torch.ones(8))
    opt = AccumSGDM([p], lr=0.1, accum_steps=3, backend="triton")
    for _ in range(2):
        p.grad = torch.full((8,), 0.5)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    cpu = AccumSGDM([q], lr=0.1, accum_steps=3, backend="torch")
    cpu.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert cpu.param_groups[0]["backend"] == "torch"
    for param, o in ((p, opt), (q, cpu)):
        param.grad = torch.full((8,), 0.5)
        o.step()
        assert o.updated
    torch.testing.assert_close(p, q)


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
def test_triton_refuses_accum_steps_beyond_int32_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AccumSGDM([p], lr=0.1, accum_steps=2, backend="triton")
    for _ in range(2):
        p.grad = torch.ones(4)
        opt.step()
    opt.param_groups[0]["accum_steps"] = 2 ** 31 + 5
    before = p.detach().clone()
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="accum_steps"):
        opt.step()
    assert torch.equal(p, before) and opt.micro_step == 0
