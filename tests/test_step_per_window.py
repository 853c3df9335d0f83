"""step_per_window=True: a training framework's own loop (k backward passes of loss / k, then
one step()) with fold_in_backward's hooks. Exact variants equal torch.optim stepped on the
accumulated .grad of the same loop, short last windows included; mean_of_squares equals Su's
rule with each backward's gradient times k as its micro-batch estimate."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from reference import su_mean_of_squares
from triton_device import DEVICE, TRITON_RUNS

K = 3
SHAPES = [(4, 3), (5,), (2,)]
EXACT = [
    (AccumSGDM, torch.optim.SGD, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    (AccumAdam, torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdamW, torch.optim.AdamW, dict()),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
       for cls, _, kw in EXACT]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="Triton cannot run here"))]


def schedule(n, seed=0):
    """n micro-batches: per parameter a gradient row (None: takes no part, i == 2 on odd t)."""
    gen = torch.Generator().manual_seed(seed)
    return [[None if (i == 2 and t % 2) else torch.randn(s, generator=gen, dtype=torch.float64)
             for i, s in enumerate(SHAPES)] for t in range(n)]


def framework_loop(params, opt, rows, k, dtype, device, windows):
    """The framework's loop: each backward of loss / k (the framework divides), step() after
    every k-th backward and after the last; returns the parameters after each step()."""
    out, counts = [], []
    for t, row in enumerate(rows):
        loss = sum((p * g.to(device, dtype)).sum() for p, g in zip(params, row) if g is not None)
        (loss / k).backward()
        counts.append(getattr(opt, "micro_step", None))
        if (t + 1) % k == 0 or t + 1 == len(rows):
            opt.step()
            opt.zero_grad()
            out.append([p.detach().double().cpu().clone() for p in params])
    windows.append(counts)
    return out


def run_pair(acc_cls, torch_cls, kwargs, backend, n):
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cpu" if backend == "torch" else DEVICE
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    rows = schedule(n)
    counts = []
    mine = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in init]
    opt = acc_cls(mine, lr=0.05, accum_steps=K, fold_in_backward=True, step_per_window=True,
                  backend=backend, second_moment="square_of_mean", **kwargs) \
        if acc_cls is not AccumSGDM else \
        acc_cls(mine, lr=0.05, accum_steps=K, fold_in_backward=True, step_per_window=True,
                backend=backend, **kwargs)
    got = framework_loop(mine, opt, rows, K, dtype, device, counts)
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    want = framework_loop(theirs, torch_cls(theirs, lr=0.05, **kwargs), rows, K,
                          torch.float64, "cpu", [])
    return got, want, counts, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc_cls,torch_cls,kwargs", EXACT, ids=IDS)
def test_exact_variants_equal_torch_optim_on_the_frameworks_accumulation(
        acc_cls, torch_cls, kwargs, backend):
    n = 3 * K + 2  # three full windows and a short one of 2
    got, want, counts, opt = run_pair(acc_cls, torch_cls, kwargs, backend, n)
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-6)
    assert len(got) == len(want) == 4
    for w, (a_params, b_params) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(a_params, b_params)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: (
                f"{backend}, window {w} ({'short' if w == 3 else 'full'}), param {i}: {m}"))
    # micro_step counts each backward when it ends.
    assert counts[0] == [1, 2, 3] * 3 + [1, 2], counts
    assert opt.num_updates == 4 and opt.micro_step == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_of_squares_takes_each_backward_times_k_as_its_estimate(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cpu" if backend == "torch" else DEVICE
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    rows = schedule(2 * K, seed=5)
    params = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in init]
    opt = AccumAdamW(params, lr=0.05, weight_decay=0.1, accum_steps=K, fold_in_backward=True,
                     step_per_window=True, backend=backend)
    got = framework_loop(params, opt, rows, K, dtype, device, [])
    # The gradient each backward sees is g / k: its estimate of the window gradient is g.
    seen = [[None if g is None else g / K for g in row] for row in rows]
    want = su_mean_of_squares(init, seen, K, lr=0.05, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False,
                              maximize=False, reduction="sum")
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-6)
    for w, (a_params, (b_params, _, _)) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(a_params, b_params)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"window {w}, param {i}: {m}")


def test_a_backward_beyond_accum_steps_raises_naming_it():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], accum_steps=2, fold_in_backward=True, step_per_window=True)
    for _ in range(2):
        (p * 2).sum().backward()
    assert opt.micro_step == 2
    with pytest.raises(RuntimeError, match="accum_steps"):
        (p * 2).sum().backward()
    opt.step()  # the window of 2 still ends normally
    assert opt.updated and opt.num_updates == 1


def test_step_per_window_needs_fold_in_backward():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="step_per_window"):
        AccumAdamW([p], step_per_window=True)


def test_a_step_with_no_backward_since_the_last_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdamW([p], accum_steps=2, fold_in_backward=True, step_per_window=True)
    opt.step()
    assert not opt.updated and opt.num_updates == 0 and torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_one_micro_batch_per_backward(reentrant):
    """Every parameter inside checkpointed blocks: with reentrant checkpointing the hooks run
    in nested autograd tasks, whose ends are not the backward's."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4, dtype=torch.float64) for _ in range(3)])
    reference = [p.detach().clone() for p in blocks.parameters()]
    xs = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2 * K)]

    def loss_of(x):
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=reentrant)
        return x.square().sum() / K

    opt = AccumSGDM(blocks.parameters(), lr=0.1, momentum=0.9, accum_steps=K,
                    fold_in_backward=True, step_per_window=True)
    seen = []
    for t, x in enumerate(xs):
        loss_of(x).backward()
        seen.append(opt.micro_step)
        if (t + 1) % K == 0:
            opt.step()
    # Reentrant: no hook runs in the outer task, whose end the hooks cannot see; the next
    # backward's first hook completes the micro-step, so the count lags until then.
    assert seen == ([0, 1, 2, 0, 1, 2] if reentrant else [1, 2, 3, 1, 2, 3]), seen
    opt.remove_hooks()
    got = [p.detach().clone() for p in blocks.parameters()]
    with torch.no_grad():
        for p, r in zip(blocks.parameters(), reference):
            p.copy_(r)
    ref_opt = torch.optim.SGD(blocks.parameters(), lr=0.1, momentum=0.9)
    for t, x in enumerate(xs):
        loss_of(x).backward()
        if (t + 1) % K == 0:
            ref_opt.step()
            ref_opt.zero_grad()
    for i, (a, b) in enumerate(zip(got, blocks.parameters())):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"param {i}: {m}")


def test_a_closure_running_the_last_backward_inside_step():
    """Lightning's automatic optimization: the window's last forward and backward run in the
    closure step() is given."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AccumSGDM([p], lr=0.1, momentum=0.5, accum_steps=2, fold_in_backward=True,
                    step_per_window=True)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.5)
    for o, w in ((opt, p), (ref, q)):
        for _ in range(2):
            (w * 2 / 2).sum().backward()

            def closure(w=w):
                loss = (w * 3 / 2).sum()
                loss.backward()
                return loss
            o.step(closure)
            o.zero_grad()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_a_framework_accumulating_fewer_than_accum_steps_gets_a_warning():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], accum_steps=4, fold_in_backward=True, step_per_window=True)
    with pytest.warns(UserWarning, match="accum_steps") as record:
        for _ in range(3):
            for _ in range(2):  # the framework's k is 2
                (p * 2).sum().backward()
            opt.step()
    assert sum("accum_steps" in str(w.message) for w in record) == 1
    assert opt.num_updates == 3  # every window still ends at step()


def test_one_short_last_window_does_not_warn():
    import warnings
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], accum_steps=2, fold_in_backward=True, step_per_window=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            for t in range(5):  # windows of 2, 2, 1 per epoch
                (p * 2).sum().backward()
                if t % 2 == 1 or t == 4:
                    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_between_backwards_keeps_the_window_position(backend):
    """Frameworks checkpoint between backward passes: the resumed optimizer counts the
    backwards already folded (micro_step, and the backward beyond accum_steps still raises)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cpu" if backend == "torch" else DEVICE
    rows = schedule(2 * K, seed=9)

    def make(values):
        params = [torch.nn.Parameter(v.detach().clone()) for v in values]
        return params, AccumSGDM(params, lr=0.1, momentum=0.9, nesterov=True, accum_steps=K,
                                 fold_in_backward=True, step_per_window=True, backend=backend)

    def go(cut):
        params, opt = make([torch.ones(s, dtype=dtype, device=device) for s in SHAPES])
        for t, row in enumerate(rows):
            sum((p * g.to(device, dtype)).sum() for p, g in zip(params, row)
                if g is not None).div(K).backward()
            if t == cut:
                saved = opt.state_dict()
                opt.remove_hooks()
                params, opt = make(params)
                opt.load_state_dict(saved)
                assert opt.micro_step == t % K + 1, (t, opt.micro_step)
            if (t + 1) % K == 0:
                opt.step()
        return [p.detach().clone() for p in params]

    want = go(None)
    for cut in range(2 * K):
        for i, (a, b) in enumerate(zip(go(cut), want)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: (
                f"{backend}, checkpoint after backward {cut}, param {i}: {m}"))
