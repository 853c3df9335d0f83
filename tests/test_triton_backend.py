"""backend="triton" gives the torch backend's numbers: every variant and flag, odd sizes,
several windows, missing gradients, fp32 / bf16 / fp16, GradScaler drops, state_dict."""
import io

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import DEVICE, needs_triton

pytestmark = needs_triton

SHAPES = [(1,), (5,), (1000,), (4099,), (33, 17), (0,)]
K = 3
MICRO_STEPS = 8  # two windows of 3 and part of a third

VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, maximize=True, accum_reduction="sum")),
    (AccumSGDM, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.0, weight_decay=0.1, maximize=True)),
    (AccumAdam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdam, dict(betas=(0.0, 0.99), maximize=True, accum_reduction="sum")),
    (AccumAdamW, dict(amsgrad=True)),
    (AccumAdam, dict(second_moment="square_of_mean", weight_decay=0.1)),
    (AccumAdamW, dict(second_moment="square_of_mean", amsgrad=True, maximize=True)),
    (AccumAdamW, dict(second_moment="square_of_mean", accum_reduction="sum")),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in VARIANTS]


def schedule(dtype, seed=0):
    """Initial parameters and per-micro-step gradients; parameter i has no gradient when
    (t + i) % 4 == 3, so some tensors miss micro-steps, including a window's last."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[None if (t + i) % 4 == 3 else torch.randn(s, generator=gen)
              for i, s in enumerate(SHAPES)] for t in range(MICRO_STEPS)]
    return init, grads


def run(cls, kwargs, backend, dtype, init, grads, scaler_bad=None):
    params = [torch.nn.Parameter(p.to(DEVICE, dtype).clone()) for p in init]
    opt = cls(params, lr=1e-2, accum_steps=K, backend=backend, **kwargs)
    history = []
    for t, row in enumerate(grads):
        for p, g in zip(params, row):
            p.grad = None if g is None else g.to(DEVICE, dtype)
        opt.step()
        history.append((opt.updated, opt.num_updates, opt.micro_step))
    return params, opt, history


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_triton_matches_torch_backend_fp32(cls, kwargs):
    init, grads = schedule(torch.float32)
    want, want_opt, want_history = run(cls, kwargs, "torch", torch.float32, init, grads)
    got, got_opt, got_history = run(cls, kwargs, "triton", torch.float32, init, grads)
    assert got_history == want_history
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
        for key, value in want_opt.state[b].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(
                    got_opt.state[a][key].cpu().to(value.dtype), value.cpu(), rtol=1e-5,
                    atol=1e-6, msg=lambda m: f"param {i} state {key!r}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kwargs", VARIANTS[::3], ids=IDS[::3])
def test_triton_low_precision_tracks_fp32(cls, kwargs, dtype):
    """bf16 / fp16 parameters and state, fp32 math inside the kernel: within the storage
    dtype's rounding of the fp32 run."""
    init, grads = schedule(torch.float32)
    want, _, _ = run(cls, kwargs, "torch", torch.float32, init, grads)
    got, opt, _ = run(cls, kwargs, "triton", dtype, init, grads)
    tol = tolerance(dtype)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        assert all(v.dtype == dtype for k, v in opt.state[a].items()
                   if torch.is_tensor(v) and k != "step")
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol,
                                   msg=lambda m: f"{dtype} param {i}: {m}")


@pytest.mark.parametrize("cls,kwargs", [VARIANTS[0], VARIANTS[2], VARIANTS[4], VARIANTS[7]],
                         ids=[IDS[0], IDS[2], IDS[4], IDS[7]])
def test_grad_scaler_drops_on_the_device(cls, kwargs):
    """An inf micro-batch is dropped by the kernels (no host sync on the step) and not counted;
    the run equals the torch backend's, and reading ``updated`` syncs the window back."""
    init, grads = schedule(torch.float32, seed=1)
    results = {}
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(p.to(DEVICE).clone()) for p in init]
        opt = cls(params, lr=1e-2, accum_steps=K, backend=backend, **kwargs)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 8)
        flags = []
        for t, row in enumerate(grads):
            loss = sum((p * g.to(DEVICE)).sum() for p, g in zip(params, row) if g is not None)
            scaler.scale(loss).backward()
            if t in (2, 4):  # micro-steps at which parameter 2 has a gradient
                params[2].grad[7] = float("nan")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if backend == "triton":
                assert not opt._window_known, "the triton step synced on found_inf"
            flags.append((opt.updated, opt.num_updates, opt.micro_step))
        results[backend] = params, flags
    (want, want_flags), (got, got_flags) = results["torch"], results["triton"]
    assert got_flags == want_flags
    assert want_flags[-1][1] == 2, "6 good micro-batches should make 2 windows of 3"
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("cls,kwargs", [VARIANTS[0], VARIANTS[3], VARIANTS[4], VARIANTS[8]],
                         ids=[IDS[0], IDS[3], IDS[4], IDS[8]])
@pytest.mark.parametrize("cut", [2, 4])
@pytest.mark.parametrize("resume_backend", ["triton", "torch"])
def test_state_dict_mid_window_across_backends(cls, kwargs, cut, resume_backend):
    """Saved mid-window on the triton backend, resumed on either backend: the same run."""
    init, grads = schedule(torch.float32, seed=2)
    want, _, _ = run(cls, kwargs, "triton", torch.float32, init, grads)
    first, opt, _ = run(cls, kwargs, "triton", torch.float32, init, grads[:cut])
    saved = roundtrip(opt.state_dict())
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = cls(params, lr=1e-2, accum_steps=K, backend=resume_backend, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.micro_step == cut % K
    for row in grads[cut:]:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.to(DEVICE)
        resumed.step()
    exact = resume_backend == "triton"
    for i, (a, b) in enumerate(zip(params, want)):
        if exact:
            assert torch.equal(a, b), f"param {i} differs after resuming at micro-step {cut}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_device_window_is_built_once_and_rebuilt_on_load():
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(4,), (9,)]]
    opt = AccumAdamW(params, accum_steps=2, backend="triton")
    windows = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        windows.append(next(iter(opt._device_windows.values())))
    assert windows[0] is windows[1] is windows[2]
    opt.load_state_dict(opt.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert next(iter(opt._device_windows.values())) is not windows[0]


def test_a_parameter_the_kernels_cannot_take_runs_the_torch_path():
    base = torch.randn(6, 4, device=DEVICE)
    strided = torch.nn.Parameter(base.t())  # not contiguous
    plain = torch.nn.Parameter(torch.randn(5, device=DEVICE))
    opt = AccumSGDM([strided, plain], lr=0.1, accum_steps=2, backend="triton")
    ref_params = [torch.nn.Parameter(strided.detach().clone()),
                  torch.nn.Parameter(plain.detach().clone())]
    ref = AccumSGDM(ref_params, lr=0.1, accum_steps=2, backend="torch")
    for _ in range(4):
        for p, r in zip([strided, plain], ref_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert not opt._device_windows
    for a, b in zip([strided, plain], ref_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_scaler", [False, True])
def test_accum_steps_change_mid_window_takes_effect_at_the_next(with_scaler):
    """accum_steps changed inside a window applies from the next one, also when only the device
    knows where windows start (GradScaler drops)."""
    init, grads = schedule(torch.float32, seed=3)
    results = {}
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(p.to(DEVICE).clone()) for p in init]
        opt = AccumAdamW(params, lr=1e-2, accum_steps=3, backend=backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 8) if with_scaler else None
        flags = []
        for t, row in enumerate(grads):
            if scaler is None:
                for p, g in zip(params, row):
                    p.grad = None if g is None else g.to(DEVICE)
                opt.step()
            else:
                loss = sum((p * g.to(DEVICE)).sum() for p, g in zip(params, row) if g is not None)
                scaler.scale(loss).backward()
                if t == 0:
                    params[0].grad[0] = float("inf")
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            if t == 1:  # inside the first window
                for group in opt.param_groups:
                    group["accum_steps"] = 2
        # Read only at the end: reading syncs the window to the host, which would then pass the
        # window's own k and hide whether the device keeps it.
        flags.append((opt.updated, opt.num_updates, opt.micro_step))
        results[backend] = params, flags
    (want, want_flags), (got, got_flags) = results["torch"], results["triton"]
    assert got_flags == want_flags
    # Windows of 3, then 2 and 2 (8 micro-batches, or 7 good ones with the scaler).
    assert want_flags[-1][1] == 3, want_flags
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


def test_a_misaligned_gradient_reaches_the_kernel_as_an_aligned_copy(monkeypatch):
    """A contiguous gradient at an odd offset (a view into a larger buffer) would fault the
    kernels' 16-byte accesses on a GPU: the kernel gets an aligned copy, with the same result."""
    import accumopt.kernels.tables as tables
    seen = []
    original = tables.DeviceWindow.set_grads

    def record(self, grads, addresses=None):
        original(self, grads, addresses)
        seen.extend(g.data_ptr() for g in self._grads_alive if torch.is_tensor(g))
    monkeypatch.setattr(tables.DeviceWindow, "set_grads", record)
    results = []
    for misaligned in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 33).to(DEVICE))
        opt = AccumAdamW([p], lr=0.1, accum_steps=2, backend="triton")
        for t in range(2):
            buf = torch.arange(34, dtype=torch.float32, device=DEVICE) / 10 + t
            p.grad = buf[1:] if misaligned else buf[1:].clone()
            assert (p.grad.data_ptr() % 16 != 0) == misaligned
            opt.step()
        results.append(p.detach().clone())
    assert seen and all(ptr % 16 == 0 for ptr in seen), "a misaligned address reached the kernel"
    assert torch.equal(results[0], results[1])
