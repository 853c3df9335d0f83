"""No micro-batch lost or counted twice: a run checkpointed at any point of the loop — between
backward and step() included, where fold_in_backward has already folded the micro-batch and the
resumed optimizer's step() completes it — and resumed from a state_dict (through torch.save and a
weights_only torch.load), a deep copy or a pickle, gives the parameters of the run never
interrupted: bit for bit on the torch backend, within float tolerance on Triton."""
import copy
import gc
import io
import pickle

import pytest
import torch

import accumopt.kernels.tables as tables
from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import DEVICE, TRITON_RUNS

K = 3
STEPS = 8
SHAPES = [(6, 5), (7,), (300,), (2,)]
VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, nesterov=True)),
    (AccumAdamW, dict()),
    (AccumAdam, dict(second_moment="square_of_mean", amsgrad=True, weight_decay=0.1)),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
       for cls, kw in VARIANTS]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="Triton cannot run here"))]


def schedule(seed=0):
    """Per micro-step one gradient per parameter; parameter i takes no part when
    (t + i) % 4 == 3, on windows' last micro-steps too."""
    gen = torch.Generator().manual_seed(seed)
    return [[None if (t + i) % 4 == 3 else torch.randn(s, generator=gen)
             for i, s in enumerate(SHAPES)] for t in range(STEPS)]


def backward(params, row):
    sum((p * g.to(p.device)).sum() for p, g in zip(params, row) if g is not None).backward()


def make(cls, kwargs, backend, hook, values):
    params = [torch.nn.Parameter(v.detach().clone()) for v in values]
    return params, cls(params, lr=0.05, accum_steps=K, backend=backend, fold_in_backward=hook,
                       **kwargs)


def resume(how, cls, kwargs, backend, hook, params, opt):
    """The run's state carried over to a new optimizer (and new parameters) as ``how`` says."""
    if how == "state_dict":
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        values = [p.detach().clone() for p in params]
        opt.remove_hooks()
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        params, opt = make(cls, kwargs, backend, hook, values)
        opt.load_state_dict(saved)
        return params, opt
    if how == "deepcopy":
        return copy.deepcopy((params, opt))
    if how == "pickle":
        params, opt = pickle.loads(pickle.dumps((params, opt)))
        return params, opt
    raise AssertionError(how)


def run(cls, kwargs, backend, hook, checkpoint=None):
    """``checkpoint`` = (micro-step, "before_step" or "after_step", how)."""
    rows = schedule()
    params, opt = make(cls, kwargs, backend, hook, [torch.randn(s, generator=torch.Generator()
                                                                .manual_seed(i + 10)).to(DEVICE)
                                                    for i, s in enumerate(SHAPES)])
    history = []
    for t, row in enumerate(rows):
        backward(params, row)
        if checkpoint and checkpoint[:2] == (t, "before_step"):
            old = opt
            params, opt = resume(checkpoint[2], cls, kwargs, backend, hook, params, opt)
            old.remove_hooks()
            del old
            if not hook:
                # Step mode's micro-batch is still in .grad, which no checkpoint holds (as with
                # torch.optim): the resumed run recomputes it.
                for p in params:
                    p.grad = None
                backward(params, row)
        opt.step()
        opt.zero_grad()
        if checkpoint and checkpoint[:2] == (t, "after_step"):
            old = opt
            params, opt = resume(checkpoint[2], cls, kwargs, backend, hook, params, opt)
            old.remove_hooks()
            del old
        history.append(([p.detach().clone() for p in params], opt.updated, opt.num_updates))
    return history


def assert_same(got, want, exact, what):
    for t, ((gp, gu, gn), (wp, wu, wn)) in enumerate(zip(got, want)):
        assert (gu, gn) == (wu, wn), f"{what}, micro-step {t}: (updated, num_updates) " \
                                     f"{(gu, gn)} vs uninterrupted {(wu, wn)}"
        for i, (a, b) in enumerate(zip(gp, wp)):
            if exact:
                assert torch.equal(a, b), f"{what}, micro-step {t}, param {i}: " \
                                          f"max diff {(a - b).abs().max().item():.3g}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: (
                    f"{what}, micro-step {t}, param {i}: {m}"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", [False, True], ids=["step", "fold_in_backward"])
@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_resume_from_state_dict_at_every_point(monkeypatch, cls, kwargs, backend, hook):
    # Triton hook mode: the two large tensors are held for a shared launch (the first micro-
    # step's first one launches alone), the rest are stashed for step(), so checkpoints between
    # backward and step() find held, stashed and folded gradients.
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)
    want = run(cls, kwargs, backend, hook)
    points = ["after_step", "before_step"]
    for t in range(STEPS - 1):
        for where in points:
            got = run(cls, kwargs, backend, hook, (t, where, "state_dict"))
            assert_same(got, want, backend == "torch",
                        f"{backend} {'hook' if hook else 'step'} mode, state_dict {where} at {t}")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", [False, True], ids=["step", "fold_in_backward"])
@pytest.mark.parametrize("cls,kwargs", VARIANTS[::2], ids=IDS[::2])
def test_copies_keep_the_window(monkeypatch, cls, kwargs, backend, hook, how):
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)
    want = run(cls, kwargs, backend, hook)
    for t in (1, 2, 4):
        for where in ("after_step", "before_step"):
            got = run(cls, kwargs, backend, hook, (t, where, how))
            assert_same(got, want, backend == "torch",
                        f"{backend} {'hook' if hook else 'step'} mode, {how} {where} at {t}")


def test_torch_save_of_the_whole_optimizer_keeps_the_window():
    params, opt = make(AccumAdamW, {}, "torch", False, [torch.ones(3)])
    for _ in range(2):
        params[0].grad = torch.full((3,), 0.5)
        opt.step()
    buf = io.BytesIO()
    torch.save((params, opt), buf)
    buf.seek(0)
    params2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.micro_step == 2 and opt2.num_updates == 0
    for p, o in ((params, opt), (params2, opt2)):
        p[0].grad = torch.full((3,), 0.5)
        o.step()
        assert o.updated, "the copy missed the window's last micro-step"
    assert torch.equal(params[0], params2[0])


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_triton_parameter_storage_replaced_mid_window(cls, kwargs):
    """``p.data = ...`` mid-window (weight tying, model surgery) rebuilds the device tables
    without losing the micro-batches already folded."""
    def go(replace_at):
        rows = schedule(1)
        params, opt = make(cls, kwargs, "triton", False, [torch.linspace(-1, 1, 1).expand(s)
                                                          .contiguous().to(DEVICE) * (i + 1)
                                                          for i, s in enumerate(SHAPES)])
        for t, row in enumerate(rows):
            if t == replace_at:
                params[0].data = params[0].data.clone()
            for p, g in zip(params, row):
                p.grad = None if g is None else g.to(DEVICE)
            opt.step()
        return [p.detach().clone() for p in params]

    want = go(None)
    for t in range(1, STEPS):
        for i, (a, b) in enumerate(zip(go(t), want)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: (
                f"storage replaced at micro-step {t}, param {i}: {m}"))


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
def test_triton_group_moved_to_torch_path_keeps_its_window():
    """A group the kernels stop taking mid-window (here: a parameter made non-contiguous) runs
    on the torch path from the device's counters."""
    def go(switch_at):
        rows = schedule(2)
        params, opt = make(AccumSGDM, dict(momentum=0.9, dampening=0.3), "triton", False,
                           [torch.ones(s).to(DEVICE) for s in SHAPES])
        for t, row in enumerate(rows):
            if t == switch_at:
                params[0].data = params[0].data.t().contiguous().t()
            for p, g in zip(params, row):
                p.grad = None if g is None else g.to(DEVICE)
            opt.step()
        return [p.detach().clone() for p in params]

    want = go(None)
    for t in (1, 2, 4):
        for i, (a, b) in enumerate(zip(go(t), want)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: (
                f"switched at micro-step {t}, param {i}: {m}"))
    gc.collect()


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
def test_triton_checkpoint_after_only_dropped_micro_batches_loads():
    """GradScaler drops on the device before any window opened: the state_dict has no window."""
    p = torch.nn.Parameter(torch.ones(8, device=DEVICE))
    opt = AccumSGDM([p], lr=0.1, momentum=0.9, nesterov=True, accum_steps=2, backend="triton")
    p.grad = torch.ones(8, device=DEVICE)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    saved = opt.state_dict()
    assert saved["accum"]["micro_step"] == 0 and saved["accum"]["window_accum_steps"] is None
    q = torch.nn.Parameter(p.detach().clone())
    fresh = AccumSGDM([q], lr=0.1, momentum=0.9, nesterov=True, accum_steps=2, backend="triton")
    fresh.load_state_dict(saved)
    for param, o in ((p, opt), (q, fresh)):
        for _ in range(2):
            param.grad = torch.full((8,), 0.5, device=DEVICE)
            o.step()
        assert o.updated
    assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:the lr of param group")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle", "other-backend"])
@pytest.mark.parametrize("large", [False, True], ids=["all-stashed", "hook-launches"])
def test_an_lr_changed_between_backward_and_step_survives_a_checkpoint_there(
        monkeypatch, backend, how, large):
    """fold_in_backward: a micro-step keeps the hyperparameters its first hook read (the hooks
    of a window's last micro-step move parameters inside backward). An lr changed between
    backward and step(), then a checkpoint or copy, then step(): the run never interrupted's
    parameters (within float tolerance when loaded on the other backend), and step mode's with
    the change made after step() (the independent reference), on both backends."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 30 if large else 1 << 30)
    other = "torch" if backend == "triton" else "triton"
    if how == "other-backend" and not TRITON_RUNS:
        pytest.skip("Triton cannot run here")
    device = DEVICE if backend == "triton" else "cpu"

    def train(hook, cut):
        gen = torch.Generator().manual_seed(9)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]
        opt = AccumAdamW(params, lr=0.1, accum_steps=2, fold_in_backward=hook, backend=backend)
        for t in range(4):
            grads = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
            # The 1-D parameters get a gradient on a window's first micro-step only: step()
            # moves them on its last (the others move in their hooks, or step() from the stash).
            sum((p * g).sum() for p, g in zip(params, grads)
                if t % 2 == 0 or p.dim() > 1).backward()
            if hook and t % 2:
                opt.param_groups[0]["lr"] *= 0.5
            if cut and t == 3:
                old = opt
                params, opt = (resume("state_dict", AccumAdamW, {}, other, True, params, opt)
                               if how == "other-backend" else
                               resume(how, AccumAdamW, {}, backend, True, params, opt))
                old.remove_hooks()
            opt.step()
            if not hook and t % 2:
                opt.param_groups[0]["lr"] *= 0.5
            opt.zero_grad()
        opt.remove_hooks()
        return [p.detach() for p in params]

    whole, resumed, stepped = train(True, False), train(True, True), train(False, False)
    for i, (a, b, c) in enumerate(zip(whole, resumed, stepped)):
        exact = how != "other-backend"         # (the backends agree within float tolerance)
        torch.testing.assert_close(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6,
                                   msg=lambda m: f"param {i} resumed: {m}")
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} vs step mode: {m}")

