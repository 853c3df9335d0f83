"""Window semantics: updated / num_updates, changing accum_steps at the next window, the last
short window, unused parameters, param groups, token-weighted windows with accum_reduction="sum"."""
import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from reference import make_problem, window_gradient


def test_updated_and_num_updates_follow_the_window():
    p = torch.nn.Parameter(torch.ones(2))
    opt = AccumSGDM([p], lr=0.1, accum_steps=3)
    seen = []
    for _ in range(7):
        p.grad = torch.ones(2)
        opt.step()
        seen.append((opt.updated, opt.num_updates, opt.micro_step))
    assert seen == [(False, 0, 1), (False, 0, 2), (True, 1, 0), (False, 1, 1), (False, 1, 2),
                    (True, 2, 0), (False, 2, 1)]


def run_with_schedule_of_k(opt, params, schedule, ks):
    """Feed micro-batches, setting accum_steps to ks[i] right after micro-step i (if given)."""
    for t, row in enumerate(schedule):
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
        if t in ks:
            for group in opt.param_groups:
                group["accum_steps"] = ks[t]


def torch_reference(init, windows, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torch.optim.SGD(params, **kwargs)
    for window in windows:
        for i, p in enumerate(params):
            p.grad = window_gradient(window, i, "mean")
        opt.step()
    return params


def test_accum_steps_change_takes_effect_at_the_next_window():
    init, schedule = make_problem(0, [(4,)], 1, 9, 0.0)
    params = [torch.nn.Parameter(init[0].clone())]
    opt = AccumSGDM(params, lr=0.1, momentum=0.9, accum_steps=4)
    # Changed after micro-step 1 (mid-window): the first window stays 4, then windows of 5.
    run_with_schedule_of_k(opt, params, schedule, {1: 5})
    assert opt.num_updates == 2 and opt.micro_step == 0
    want = torch_reference(init, [schedule[:4], schedule[4:9]], lr=0.1, momentum=0.9)
    torch.testing.assert_close(params[0].detach(), want[0].detach(), rtol=1e-12, atol=1e-12)


def test_last_short_window_of_an_epoch():
    """10 micro-batches with accum_steps=4: at the start of the last window set accum_steps to
    the 2 left; the epoch then ends on an update and matches torch.optim on windows 4, 4, 2."""
    init, schedule = make_problem(1, [(3,), (2,)], 1, 10, 0.0)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AccumAdamW(params, accum_steps=4, second_moment="square_of_mean")
    for t, row in enumerate(schedule):
        left = len(schedule) - t
        if opt.micro_step == 0 and left < 4:
            for group in opt.param_groups:
                group["accum_steps"] = left
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
    assert opt.updated and opt.num_updates == 3
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ropt = torch.optim.AdamW(ref)
    for window in (schedule[:4], schedule[4:8], schedule[8:]):
        for i, p in enumerate(ref):
            p.grad = window_gradient(window, i, "mean")
        ropt.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,kwargs", [(AccumSGDM, dict(momentum=0.9)),
                                        (AccumAdam, dict()),
                                        (AccumAdam, dict(second_moment="square_of_mean"))])
def test_parameter_without_gradient_in_a_window_is_untouched(cls, kwargs):
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = cls([used, unused], lr=0.1, accum_steps=2, weight_decay=0.1, **kwargs)
    for _ in range(4):
        used.grad = torch.ones(3)
        opt.step()
    assert torch.equal(unused.detach(), torch.ones(3)), "a parameter with no gradient moved"
    assert len(opt.state[unused]) == 0, "state was created for a parameter with no gradient"
    assert not torch.equal(used.detach(), torch.ones(3))


def test_gradient_only_before_the_last_micro_step_still_updates_on_the_boundary():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumSGDM([p], lr=1.0, momentum=0.5, accum_steps=3)
    p.grad = torch.tensor([3.0, 6.0])
    opt.step()
    p.grad = None
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))
    opt.step()
    # torch.optim.SGD on Ḡ = (3, 6)/3 with a fresh buffer: θ = -lr·Ḡ.
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, -2.0]))


def test_param_groups_with_different_hyperparameters():
    init, schedule = make_problem(2, [(3,), (2, 2), (4,)], 3, 2, 0.2)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.1, "weight_decay": 0.1},
                         {"params": ps[1:], "lr": 0.01, "amsgrad": True}]
    opt = AccumAdam(groups(params), accum_steps=3, second_moment="square_of_mean")
    for row in schedule:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ropt = torch.optim.Adam(groups(ref))
    for window in (schedule[:3], schedule[3:]):
        for i, p in enumerate(ref):
            p.grad = window_gradient(window, i, "mean")
        ropt.step()
    for i, (a, b) in enumerate(zip(params, ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("cls,kwargs,torch_cls", [
    (AccumAdamW, dict(second_moment="square_of_mean"), torch.optim.AdamW),
    (AccumSGDM, dict(momentum=0.9, nesterov=True), torch.optim.SGD),
])
def test_token_weighted_window_with_sum_reduction(cls, kwargs, torch_cls):
    """Micro-batches of different token counts; each micro-batch loss is normalised by the whole
    window's token count, so with accum_reduction="sum" the window equals one step on the mean
    loss over all the window's tokens."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 3, dtype=torch.float64)
    ref_model = torch.nn.Linear(4, 3, dtype=torch.float64)
    ref_model.load_state_dict(model.state_dict())
    opt = cls(model.parameters(), lr=0.05, accum_steps=3, accum_reduction="sum", **kwargs)
    ropt = torch_cls(ref_model.parameters(), lr=0.05, **{k: v for k, v in kwargs.items()
                                                          if k != "second_moment"})
    for _ in range(2):
        tokens = [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (2, 7, 4)]
        targets = [torch.randn(x.shape[0], 3, generator=gen, dtype=torch.float64) for x in tokens]
        total = sum(x.shape[0] for x in tokens)
        for x, y in zip(tokens, targets):
            ((model(x) - y) ** 2).sum().div(total).backward()
            opt.step()
            opt.zero_grad()
        ((ref_model(torch.cat(tokens)) - torch.cat(targets)) ** 2).sum().div(total).backward()
        ropt.step()
        ropt.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(2))
    opt = AccumSGDM([p], lr=0.1, accum_steps=1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    torch.testing.assert_close(p.detach(), torch.full((2,), 0.8))


def test_lr_scheduler_gated_on_updated_matches_torch_stepped_per_window():
    """The README's loop: a torch LR scheduler stepped when ``opt.updated`` gives torch.optim's
    run with the scheduler stepped once per window."""
    init, schedule = make_problem(4, [(3,), (2, 2)], 1, 12, 0.0)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AccumAdamW(params, lr=0.1, accum_steps=3, second_moment="square_of_mean")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for row in schedule:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
        opt.zero_grad()
        if opt.updated:
            sched.step()
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ropt = torch.optim.AdamW(ref, lr=0.1)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=1, gamma=0.5)
    for w in range(4):
        for i, p in enumerate(ref):
            p.grad = window_gradient(schedule[3 * w:3 * w + 3], i, "mean")
        ropt.step()
        rsched.step()
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"] == 0.1 * 0.5 ** 4
    for a, b in zip(params, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
