"""accumopt.per_update(scheduler) steps the scheduler once per parameter update, so the LR per
update equals torch.optim's with the same scheduler stepped once per window; an lr changing
inside an open window warns once."""
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from accumopt import AccumAdamW, AccumSGDM, per_update

K, UPDATES = 4, 4
SCHEDULES = {
    "linear": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2) * (1 - s / 4)),
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=UPDATES),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=UPDATES),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("cls", [AccumAdamW, AccumSGDM])
def test_per_update_gives_torch_optims_lr_per_update(cls, name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], lr=0.01, accum_steps=K)
    sched = per_update(SCHEDULES[name](opt))
    q = torch.nn.Parameter(torch.ones(3))
    ref = (torch.optim.AdamW if cls is AccumAdamW else torch.optim.SGD)([q], lr=0.01)
    ref_sched = SCHEDULES[name](ref)
    got, want = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per_update must not trip the lr-in-window warning
        for t in range(K * UPDATES):
            p.grad = torch.ones(3)
            opt.step()
            if opt.updated:
                got.append(opt.param_groups[0]["lr"])
            sched.step()
    for _ in range(UPDATES):
        want.append(ref.param_groups[0]["lr"])
        q.grad = torch.ones(3)
        ref.step()
        ref_sched.step()
    assert got == pytest.approx(want, rel=1e-12), (got, want)
    assert sched.get_last_lr() == ref_sched.get_last_lr()
    assert sched.state_dict() == ref_sched.state_dict()
    assert isinstance(sched, lr_scheduler.LRScheduler)  # Lightning checks this


def test_per_update_sees_through_a_framework_optimizer_wrapper():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], lr=0.1, accum_steps=2)

    class Wrapper:  # Accelerate's AcceleratedOptimizer keeps the optimizer as .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups
            self.step = optimizer.step
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.optimizer = Wrapper(opt)
    wrapped = per_update(sched)
    for _ in range(4):
        p.grad = torch.ones(3)
        opt.step()
        wrapped.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_an_lr_change_inside_a_window_warns_once_naming_lr_and_window():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdamW([p], lr=0.01, accum_steps=K)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning) as record:
        for _ in range(3 * K):
            p.grad = torch.ones(3)
            opt.step()
            sched.step()  # per micro-batch: the mistake
    messages = [str(w.message) for w in record if "lr" in str(w.message)]
    assert len(messages) == 1, messages
    assert "window" in messages[0] and "per_update" in messages[0]


def test_an_lr_change_at_a_window_boundary_does_not_warn():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdamW([p], lr=0.01, accum_steps=K)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2 * K):
            p.grad = torch.ones(3)
            opt.step()
            if opt.updated:
                opt.param_groups[0]["lr"] *= 0.5
