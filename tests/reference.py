"""Independent references for the tests: torch.optim stepped once per window on the window
gradient, and Su's mean-of-squares rule written out plainly in float64. Nothing here imports
accumopt's math."""
import torch
from hypothesis import strategies as st


def make_problem(seed, shapes, accum_steps, windows, missing, dtype=torch.float64):
    """Initial parameters and a gradient schedule: schedule[t][i] is parameter i's gradient at
    micro-step t, or None (no gradient that micro-step) with probability ``missing``."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    schedule = []
    for _ in range(accum_steps * windows):
        row = []
        for s in shapes:
            keep = torch.rand((), generator=gen).item() >= missing
            row.append(torch.randn(s, generator=gen, dtype=dtype) if keep else None)
        schedule.append(row)
    return init, schedule


def windows_of(schedule, accum_steps):
    return [schedule[i:i + accum_steps] for i in range(0, len(schedule), accum_steps)]


def window_gradient(window, i, reduction):
    """Ḡ of parameter i: the mean (or sum) of its micro-batch gradients, a missing one counting
    as zero exactly as .grad accumulation does; None if it got none in the whole window."""
    grads = [row[i] for row in window if row[i] is not None]
    if not grads:
        return None
    total = torch.stack(grads).sum(0)
    return total / len(window) if reduction == "mean" else total


def run_accum(opt_cls, init, schedule, accum_steps, **kwargs):
    """Run an accumopt optimizer micro-step by micro-step; return a snapshot of the parameters
    and state after every window, asserting the parameters never move inside one."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = opt_cls(params, accum_steps=accum_steps, **kwargs)
    snapshots = []
    for t, row in enumerate(schedule):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        last = (t + 1) % accum_steps == 0
        assert opt.updated == last, f"micro-step {t}: updated={opt.updated}, expected {last}"
        if not last:
            for i, (p, b) in enumerate(zip(params, before)):
                assert torch.equal(p.detach(), b), \
                    f"param {i} moved inside a window at micro-step {t}"
        else:
            snapshots.append(snapshot(params, opt))
        opt.zero_grad()
    return snapshots


def run_torch_on_mean(opt_cls, init, schedule, accum_steps, reduction="mean", **kwargs):
    """torch.optim stepped once per window with Ḡ (grad None where a parameter got none)."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = opt_cls(params, **kwargs)
    snapshots = []
    for window in windows_of(schedule, accum_steps):
        for i, p in enumerate(params):
            p.grad = window_gradient(window, i, reduction)
        opt.step()
        opt.zero_grad()
        snapshots.append(snapshot(params, opt))
    return snapshots


def snapshot(params, opt):
    state = []
    for p in params:
        s = opt.state.get(p, {})
        state.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()})
    return [p.detach().clone() for p in params], state


def su_mean_of_squares(init, schedule, accum_steps, *, lr, betas, eps, weight_decay,
                       decoupled_weight_decay, amsgrad, maximize, reduction="mean", start=None,
                       skip_untouched=True):
    """Su's rule per window c, written out in float64 from the design contract:
    ĝ_t = k·w·g_t (0 where missing), coupled decay d_t = ĝ_t + λθ;
    m ← β1·m + (1-β1)·mean_t d_t; v ← β2·v + (1-β2)·mean_t d_t²;
    θ ← θ(1 - lr·λ) if decoupled; θ ← θ - lr/(1-β1^c) · m / (√v̂ /√(1-β2^c) + eps).
    ``start``: (θ, m, v, max v, update counts) to continue from, default a fresh start.
    ``skip_untouched=False`` updates a parameter with no gradient in a window too (on zeros),
    as DDP's unused parameters are."""
    beta1, beta2 = betas
    k = accum_steps
    theta = [p.clone().double() for p in init]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    vmax = [torch.zeros_like(p) for p in theta]
    count = [0] * len(theta)
    if start is not None:
        theta, m, v, vmax = ([t.clone().double() for t in tensors] for tensors in start[:4])
        count = list(start[4])
    out = []
    for window in windows_of(schedule, k):
        for i in range(len(theta)):
            if skip_untouched and all(row[i] is None for row in window):
                continue
            estimates = []
            for row in window:
                g = torch.zeros_like(theta[i]) if row[i] is None else row[i].double()
                g = -g if maximize else g
                g_hat = g if reduction == "mean" else k * g
                if weight_decay and not decoupled_weight_decay:
                    g_hat = g_hat + weight_decay * theta[i]
                estimates.append(g_hat)
            d = torch.stack(estimates)
            m[i] = beta1 * m[i] + (1 - beta1) * d.mean(0)
            v[i] = beta2 * v[i] + (1 - beta2) * (d ** 2).mean(0)
            count[i] += 1
            c = count[i]
            if weight_decay and decoupled_weight_decay:
                theta[i] = theta[i] * (1 - lr * weight_decay)
            vmax[i] = torch.maximum(vmax[i], v[i])
            denom_v = vmax[i] if amsgrad else v[i]
            m_hat = m[i] / (1 - beta1 ** c)
            theta[i] = theta[i] - lr * m_hat / (denom_v.sqrt() / (1 - beta2 ** c) ** 0.5 + eps)
        out.append(([t.clone() for t in theta], [mi.clone() for mi in m], [vi.clone() for vi in v]))
    return out


def assert_close_snapshots(got, want, keys, what, rtol=1e-10, atol=1e-12):
    """Compare per-window snapshots of parameters and the named state keys."""
    assert len(got) == len(want), f"{what}: {len(got)} windows vs {len(want)}"
    for w, ((gp, gs), (wp, ws)) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(gp, wp)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what}: window {w}, param {i}: {m}")
        for i, (a, b) in enumerate(zip(gs, ws)):
            for key in keys:
                if key in b:
                    assert key in a, f"{what}: window {w}, param {i}: state lacks {key!r}"
                    torch.testing.assert_close(
                        a[key], b[key], rtol=rtol, atol=atol,
                        msg=lambda m: f"{what}: window {w}, param {i}, state {key!r}: {m}")


shapes_strategy = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)

problem_strategy = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "shapes": shapes_strategy,
    "accum_steps": st.integers(1, 8),
    "windows": st.integers(1, 3),
    "missing": st.sampled_from([0.0, 0.0, 0.3, 0.7]),
})


def _sign_rule_on_mean(init, schedule, accum_steps, reduction, maximize, rule):
    """A one-moment rule applied once per window to Ḡ in float64: ``rule(θ, m, Ḡ)`` returns the
    new (θ, m); a parameter with no gradient in a window is left alone. (θ, m) per window."""
    theta = [p.double().clone() for p in init]
    m = [torch.zeros_like(t) for t in theta]
    out = []
    for window in windows_of(schedule, accum_steps):
        for i in range(len(theta)):
            mean = window_gradient(window, i, reduction)
            if mean is not None:
                mean = -mean.double() if maximize else mean.double()
                theta[i], m[i] = rule(theta[i], m[i], mean)
        out.append(([t.clone() for t in theta], [x.clone() for x in m]))
    return out


def tiger_on_mean(init, schedule, accum_steps, reduction="mean", *, lr, beta, weight_decay,
                  lr_scale, maximize=False):
    """Tiger's rule (bojone/tiger) applied once per window to Ḡ, written out in float64:
    m ← β·m + (1-β)·Ḡ; θ ← θ - lr·s·(sign(m) + λ·θ), s from θ before the update."""
    def rule(t, m, mean):
        m = beta * m + (1 - beta) * mean
        if lr_scale == "rms":
            s = t.pow(2).mean().sqrt()
        elif lr_scale == "row_rms":
            s = t.pow(2).mean(dim=-1, keepdim=True).sqrt() if t.dim() else t.abs()
        elif lr_scale == "half":
            s = 0.5
        else:
            s = 1.0
        decay = 0.0 if lr_scale == "half" else weight_decay
        return t - lr * s * (torch.sign(m) + decay * t), m
    return _sign_rule_on_mean(init, schedule, accum_steps, reduction, maximize, rule)


def lion_on_mean(init, schedule, accum_steps, reduction="mean", *, lr, betas, weight_decay,
                 maximize=False):
    """Lion (the paper's Algorithm 2, lion-pytorch's update) applied once per window to Ḡ,
    written out in float64: θ ← θ·(1 - lr·λ); θ ← θ - lr·sign(β1·m + (1-β1)·Ḡ);
    m ← β2·m + (1-β2)·Ḡ."""
    beta1, beta2 = betas

    def rule(t, m, mean):
        t = t * (1 - lr * weight_decay)
        t = t - lr * torch.sign(beta1 * m + (1 - beta1) * mean)
        return t, beta2 * m + (1 - beta2) * mean
    return _sign_rule_on_mean(init, schedule, accum_steps, reduction, maximize, rule)


def assert_close_windows(got, want, key, what, rtol=1e-10, atol=1e-12):
    """Compare run_accum's per-window snapshots with (θ, state) pairs of a reference."""
    assert len(got) == len(want), f"{what}: {len(got)} windows vs {len(want)}"
    for w, ((params, states), (theta, moment)) in enumerate(zip(got, want)):
        for i, p in enumerate(params):
            torch.testing.assert_close(p, theta[i].to(p.dtype), rtol=rtol, atol=atol,
                                       msg=lambda s: f"{what}: window {w}, param {i}, θ: {s}")
            if key in states[i]:
                torch.testing.assert_close(
                    states[i][key], moment[i].to(p.dtype), rtol=rtol, atol=atol,
                    msg=lambda s: f"{what}: window {w}, param {i}, {key}: {s}")
