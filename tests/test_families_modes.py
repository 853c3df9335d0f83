"""AccumTiger, AccumLion and AccumMuon in every mode (step, fold_in_backward, step_per_window
with a short last window) and on both backends (the Triton kernels fold in the interpreter, the
window's last micro-step runs in torch): all equal the family's own step mode on the torch path,
which the *_equivalence tests hold to the plain references; a state_dict taken at any micro-step
(also between backward and step()) resumes exactly; GradScaler drops a micro-batch; Muon's
accumulator is clipped like clip_grad_norm_ on Ḡ."""
import io

import pytest
import torch
from torch import nn

from accumopt import AccumLion, AccumMuon, AccumTiger, tiger_param_groups
from accumopt.backend import triton_can_run

K, WINDOWS = 3, 2
FAMILIES = {
    "tiger": (AccumTiger, dict(lr=1e-2, weight_decay=0.1)),
    "tiger-groups": (AccumTiger, dict(lr=1e-2)),
    "lion": (AccumLion, dict(lr=1e-2, weight_decay=0.1)),
    "lion-clipped": (AccumLion, dict(lr=1e-2, max_grad_norm=0.05)),
    "muon": (AccumMuon, dict(lr=2e-2)),
    "muon-no-nesterov": (AccumMuon, dict(lr=2e-2, nesterov=False, adjust_lr_fn="match_rms_adamw")),
    "muon-clipped": (AccumMuon, dict(lr=2e-2, max_grad_norm=0.05)),
}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_can_run([torch.zeros(1)]), reason="Triton cannot run here"))]
MODES = {"step": {}, "fold": dict(fold_in_backward=True),
         "window": dict(fold_in_backward=True, step_per_window=True)}
# Muon's Newton–Schulz runs in bf16: a float32 fold in another order can round one element of
# its input the other way (about lr/256 on the update). Everything else agrees to float32.
TOL = {"muon": dict(rtol=0, atol=2e-4)}


def model_of(name, seed=0):
    torch.manual_seed(seed)
    if name.startswith("muon"):     # matrices only
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    return nn.Sequential(nn.Embedding(5, 6), nn.Flatten(), nn.Linear(12, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def batch(name, i):
    gen = torch.Generator().manual_seed(100 + i)
    if name.startswith("muon"):
        return torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
    return torch.randint(0, 5, (4, 2), generator=gen), torch.randn(4, 3, generator=gen)


def make(name, model, backend, **extra):
    cls, kwargs = FAMILIES[name]
    params = tiger_param_groups(model) if name == "tiger-groups" else model.parameters()
    return cls(params, accum_steps=K, backend=backend, **kwargs, **extra)


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def run(name, backend, mode, micro_steps=WINDOWS * K):
    """The family's loop in ``mode``; parameters after each step() that moved them."""
    model = model_of(name)
    opt = make(name, model, backend, **MODES[mode])
    snapshots = []
    for i in range(micro_steps):
        x, y = batch(name, i)
        loss = loss_of(model, x, y)
        (loss / K if mode == "window" else loss).backward()
        if mode != "window" or (i + 1) % K == 0 or i + 1 == micro_steps:
            opt.step()
            opt.zero_grad()
            if opt.updated:
                snapshots.append([p.detach().clone() for p in model.parameters()])
    opt.remove_hooks()
    return snapshots


def assert_snapshots_close(got, want, what, name):
    assert len(got) == len(want), f"{what}: {len(got)} updates vs {len(want)}"
    tol = TOL.get(name.split("-")[0], dict(rtol=1e-5, atol=1e-6))
    for w, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{what}, update {w}, "
                                                                  f"param {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_mode_and_backend_equals_step_mode_on_torch(name, mode, backend):
    want = run(name, "torch", "step")
    moved = max((a - b).abs().max().item() for a, b in zip(want[0], want[-1]))
    assert moved > 1e-4, f"{name}: the parameters barely moved ({moved})"
    assert_snapshots_close(run(name, backend, mode), want, f"{name} {mode} on {backend}", name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_short_last_window_on_triton_equals_the_torch_path(name, backend):
    """step_per_window: the framework ends the last window after 2 of K backwards."""
    micro_steps = WINDOWS * K + 2
    got, want = run(name, backend, "window", micro_steps), run(name, "torch", "window",
                                                               micro_steps)
    assert len(got) == WINDOWS + 1
    assert_snapshots_close(got, want, f"{name} short window on {backend}", name)


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["step", "fold"])
@pytest.mark.parametrize("name", ["tiger", "lion", "muon", "muon-no-nesterov"])
def test_a_state_dict_at_any_micro_step_resumes_exactly(name, mode, backend):
    """Saved after the backward of micro-step ``cut`` (before its step() in fold mode), loaded
    into a fresh model and optimizer, continued: the uninterrupted run's parameters."""
    total = WINDOWS * K
    want = run(name, backend, mode, total)[-1]
    for cut in range(1, total):
        model = model_of(name)
        opt = make(name, model, backend, **MODES[mode])
        for i in range(cut):
            x, y = batch(name, i)
            loss_of(model, x, y).backward()
            if not (mode == "fold" and i == cut - 1):
                opt.step()
                opt.zero_grad()
        saved, params = roundtrip(opt.state_dict()), roundtrip(model.state_dict())
        opt.remove_hooks()
        model = model_of(name, seed=1)
        model.load_state_dict(params)
        opt = make(name, model, backend, **MODES[mode])
        opt.load_state_dict(saved)
        if mode == "fold":        # the saved micro-step's folds are in the state: complete it
            opt.step()
            opt.zero_grad()
        for i in range(cut, total):
            x, y = batch(name, i)
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        opt.remove_hooks()
        got = [p.detach() for p in model.parameters()]
        for j, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{name} {mode} {backend}: resumed after "
                                                     f"micro-step {cut}, param {j}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["tiger", "lion", "muon"])
def test_grad_scaler_drops_an_inf_micro_batch(name, backend):
    """Step mode under GradScaler with one inf micro-batch equals the run without it."""
    bad = 1
    model = model_of(name)
    opt = make(name, model, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for i in range(WINDOWS * K + 1):
        x, y = batch(name, i)
        scaler.scale(loss_of(model, x, y)).backward()
        if i == bad:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    got = [p.detach() for p in model.parameters()]
    model = model_of(name)
    opt = make(name, model, "torch")
    for i in [i for i in range(WINDOWS * K + 1) if i != bad]:
        x, y = batch(name, i)
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.num_updates == WINDOWS
    tol = TOL.get(name, dict(rtol=1e-5, atol=1e-6))
    for j, (a, b) in enumerate(zip(got, model.parameters())):
        torch.testing.assert_close(a, b.detach(), **tol,
                                   msg=lambda m: f"{name} on {backend}, param {j}: {m}")


def test_muon_window_clipping_equals_clip_grad_norm_on_the_window_gradient():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    model = model_of("muon").double()
    opt = AccumMuon(model.parameters(), lr=2e-2, accum_steps=K, max_grad_norm=0.05)
    ref = model_of("muon").double()
    ref_opt = torch.optim.Muon(ref.parameters(), lr=2e-2)
    norms = []
    for i in range(WINDOWS * K):
        x, y = batch("muon", i)
        loss_of(model, x.double(), y.double()).backward()
        opt.step()
        opt.zero_grad()
        (loss_of(ref, x.double(), y.double()) / K).backward()
        if (i + 1) % K == 0:
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
            ref_opt.step()
            ref_opt.zero_grad()
            torch.testing.assert_close(opt.grad_norm, norms[-1], rtol=1e-10, atol=1e-12)
    assert all(n > 0.05 for n in norms), f"clipping must be active: {norms}"
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-7, atol=1e-9)
