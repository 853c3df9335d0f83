"""fold_in_backward hooks have one owner: a second live optimizer on hooked parameters is an
error (until the first removes its hooks or is dropped), a dropped optimizer leaves no hooks
behind, and a refused GradScaler step leaves the optimizer usable."""
import gc

import pytest
import torch

from accumopt import AccumAdamW, AccumSGDM


def hooks_on(p):
    return len(getattr(p, "_post_accumulate_grad_hooks", None) or {})


def test_a_second_live_fold_in_backward_optimizer_is_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    first = AccumAdamW([p], accum_steps=2, fold_in_backward=True)
    with pytest.raises(ValueError, match="fold_in_backward"):
        AccumSGDM([p], accum_steps=2, fold_in_backward=True)
    assert hooks_on(p) == 1, "the refused optimizer left a hook behind"
    (p * 2).sum().backward()
    assert p.grad is None and first.state[p]["window_folds"] == 1
    AccumSGDM([p], accum_steps=2)  # step mode takes no hooks: allowed


@pytest.mark.parametrize("hand_over", ["remove_hooks", "del"])
def test_hand_over_after_remove_hooks_or_drop(hand_over):
    p = torch.nn.Parameter(torch.ones(3))
    first = AccumAdamW([p], accum_steps=2, fold_in_backward=True)
    if hand_over == "remove_hooks":
        first.remove_hooks()
    else:
        del first
    second = AccumSGDM([p], lr=0.5, momentum=0.5, accum_steps=1, fold_in_backward=True)
    (p * 2).sum().backward()
    second.step()
    assert torch.equal(p.detach(), torch.full((3,), 0.0)), "the new owner did not fold"


def test_a_second_group_on_hooked_parameters_is_refused_before_anything_changes():
    p, other = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AccumAdamW([p], fold_in_backward=True)
    holder = AccumSGDM([other], accum_steps=2, fold_in_backward=True)
    with pytest.raises(ValueError, match="fold_in_backward"):
        opt.add_param_group({"params": [other]})
    assert len(opt.param_groups) == 1 and hooks_on(other) == 1
    (other * 2).sum().backward()
    assert holder.state[other]["window_folds"] == 1, "the live owner lost the gradient"


def test_param_groups_given_as_generators_keep_their_parameters():
    model = torch.nn.Linear(3, 2)
    opt = AccumSGDM([{"params": model.parameters()}], accum_steps=1)
    assert len(opt.param_groups[0]["params"]) == 2
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.ones(1))])})
    assert len(opt.param_groups[1]["params"]) == 1


def test_dropped_optimizers_leave_no_hooks_behind():
    p = torch.nn.Parameter(torch.ones(3))
    for _ in range(50):
        opt = AccumAdamW([p], accum_steps=2, fold_in_backward=True)
        del opt
    gc.collect()
    assert hooks_on(p) == 0, f"{hooks_on(p)} hooks of dropped optimizers are still registered"
    (p * 2).sum().backward()
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_an_exception_inside_grad_scaler_step_leaves_no_scale_behind():
    p = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = AccumSGDM([{"params": [p]}, {"params": emb.parameters()}], lr=0.1, momentum=0.9,
                    accum_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * 2).sum() + emb(torch.tensor([1])).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    # The next micro-batch, without the sparse parameter's gradient, is unscaled exactly once.
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.0 - 0.1 * 2.0))


def test_a_refused_grad_scaler_step_in_hook_mode_leaves_the_optimizer_usable():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], lr=0.1, momentum=0.9, accum_steps=2, fold_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * 2).sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler") as err:
        scaler.step(opt)
    assert "checkpoint" in str(err.value) and "step()" in str(err.value)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.step()  # completes the pending micro-step instead of raising again
    assert opt.micro_step == 1
    (p * 2).sum().backward()
    opt.step()
    assert opt.updated and opt.num_updates == 1
