"""fold_in_backward=True: every gradient is folded and freed inside backward, with exactly step
mode's numbers: every variant, missing gradients, tied weights, param groups, state_dict
mid-window, a small model; GradScaler is refused; hooks can be removed."""
import gc
import io

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from reference import make_problem

K = 3
VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, nesterov=True, maximize=True)),
    (AccumSGDM, dict(momentum=0.0, weight_decay=0.1)),
    (AccumAdam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdamW, dict(accum_reduction="sum")),
    (AccumAdam, dict(second_moment="square_of_mean", weight_decay=0.1)),
    (AccumAdamW, dict(second_moment="square_of_mean", amsgrad=True)),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in VARIANTS]


def linear_backward(params, row):
    """A backward whose gradient for parameter i is exactly row[i]; a parameter whose row entry
    is None takes no part, so it gets no gradient (its hook does not fire)."""
    loss = sum((p * g).sum() for p, g in zip(params, row) if g is not None)
    if torch.is_tensor(loss):
        loss.backward()


def run(cls, kwargs, init, schedule, hook, checkpoint_at=None):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, lr=0.05, accum_steps=K, fold_in_backward=hook, backend="torch", **kwargs)
    seen = []
    for t, row in enumerate(schedule):
        if t == checkpoint_at:
            saved = _roundtrip(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt.remove_hooks()
            opt = cls(params, lr=0.05, accum_steps=K, fold_in_backward=hook, backend="torch",
                      **kwargs)
            opt.load_state_dict(saved)
        linear_backward(params, row)
        if hook:
            assert all(p.grad is None for p in params), "a gradient survived backward"
        opt.step()
        opt.zero_grad()
        seen.append(([p.detach().clone() for p in params],
                     [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                      for p in params], opt.updated))
    return seen


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def assert_same_runs(got, want):
    for t, ((gp, gs, gu), (wp, ws, wu)) in enumerate(zip(got, want)):
        assert gu == wu, f"micro-step {t}: updated {gu} vs {wu}"
        for i, (a, b) in enumerate(zip(gp, wp)):
            assert torch.equal(a, b), f"micro-step {t}, param {i}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(gs, ws)):
            assert a.keys() == b.keys(), f"micro-step {t}, param {i}: {a.keys()} vs {b.keys()}"
            for key in a:
                assert torch.equal(a[key], b[key]), f"micro-step {t}, param {i}, state {key}"


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_hook_mode_equals_step_mode_bitwise(cls, kwargs):
    init, schedule = make_problem(11, [(3, 2), (5,), (4,)], K, 3, missing=0.3)
    assert_same_runs(run(cls, kwargs, init, schedule, hook=True),
                     run(cls, kwargs, init, schedule, hook=False))


@pytest.mark.parametrize("cls,kwargs", [VARIANTS[0], VARIANTS[3], VARIANTS[5]],
                         ids=[IDS[0], IDS[3], IDS[5]])
@pytest.mark.parametrize("cut", [1, 4, 5])
def test_state_dict_round_trip_mid_window_in_hook_mode(cls, kwargs, cut):
    init, schedule = make_problem(12, [(3, 2), (5,)], K, 3, missing=0.2)
    assert_same_runs(run(cls, kwargs, init, schedule, hook=True, checkpoint_at=cut),
                     run(cls, kwargs, init, schedule, hook=False))


def test_gradient_only_before_the_last_micro_step_moves_in_step():
    """Hooks fold as gradients come; a parameter with none on the last micro-step is moved by
    step(), exactly as torch.optim.SGD on Ḡ would."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = AccumSGDM([p, q], lr=1.0, momentum=0.5, accum_steps=2, fold_in_backward=True)
    linear_backward([p, q], [torch.tensor([2.0, 4.0]), torch.ones(2)])
    opt.step()
    linear_backward([p, q], [None, torch.ones(2)])
    assert torch.equal(p.detach(), torch.zeros(2)), "p moved before step()"
    assert torch.equal(q.detach(), -torch.ones(2)), "q did not move in its last hook"
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, -2.0]))


class TiedMLP(torch.nn.Module):
    """An embedding, an MLP, and an output layer tied to the embedding (used twice)."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.GELU(),
                                       torch.nn.Linear(16, width))
        self.unused = torch.nn.Linear(width, width)  # never in the graph

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.mlp(h)
        return h @ self.embed.weight.t()


def train(cls, kwargs, hook, windows=3, seed=0, k=4):
    torch.manual_seed(seed)
    model = TiedMLP().double()
    opt = cls(model.parameters(), lr=1e-2, accum_steps=k, fold_in_backward=hook, **kwargs)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(windows * k):
        tokens = torch.randint(0, 11, (6, 5), generator=gen)
        targets = torch.randint(0, 11, (6, 5), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        if hook:
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_tied_mlp_trains_the_same_in_hook_and_step_mode(cls, kwargs):
    hooked, hook_losses = train(cls, kwargs, hook=True)
    stepped, step_losses = train(cls, kwargs, hook=False)
    assert hook_losses == step_losses
    for (name, a), b in zip(hooked.named_parameters(), stepped.parameters()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    assert torch.equal(hooked.unused.weight, TiedMLP().double().unused.weight), \
        "a layer outside the graph moved"


def test_tied_mlp_exact_variant_equals_torch_adamw_on_the_window_gradient():
    """The hook-mode exact variant against torch.optim.AdamW fed the window's mean gradient."""
    k = 4
    hooked, _ = train(AccumAdamW, dict(second_moment="square_of_mean"), hook=True, k=k)
    torch.manual_seed(0)
    model = TiedMLP().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(k):
            tokens = torch.randint(0, 11, (6, 5), generator=gen)
            targets = torch.randint(0, 11, (6, 5), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1),
                                                     targets.flatten())
            (loss / k).backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(hooked.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_grad_scaler_is_refused_naming_it_and_recommending_bf16():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdamW([p], accum_steps=2, fold_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * 2).sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler") as err:
        scaler.step(opt)
    assert "bf16" in str(err.value) or "bfloat16" in str(err.value)
    assert opt.micro_step == 0 and opt.num_updates == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_backward_before_step_is_refused_and_its_gradient_left_unfolded(
        backend, monkeypatch):
    """A second backward reaching a parameter the first folded raises there; what it gave
    before to parameters the first did not reach is folded (one micro-batch split over two
    backward calls), the repeated gradient is dropped, and the micro-step is the reference's:
    step mode on the gradients that were folded. A .grad set by hand on a hooked parameter is
    refused by step(), which changes nothing."""
    from triton_device import DEVICE, TRITON_RUNS
    if backend == "triton":
        if not TRITON_RUNS:
            pytest.skip("Triton cannot run here")
        import accumopt.kernels.tables as tables
        monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 50)   # params 0, 2 launch
    device = DEVICE if backend == "triton" else "cpu"
    shapes = [(60,), (7,), (55,)]
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    first, second = ([torch.randn(s, generator=gen).to(device) for s in shapes]
                     for _ in range(2))
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AccumSGDM(params, lr=0.1, momentum=0.9, accum_steps=2, fold_in_backward=True,
                    backend=backend)
    reached = []       # a hook after the optimizer's: the parameters it folded, in order
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: reached.append(i))
    linear_backward(params, [first[0], None, None])
    reached.clear()
    with pytest.raises(RuntimeError, match="second backward"):
        linear_backward(params, second)
    assert all(p.grad is None for p in params), "the repeated gradient should be dropped"
    folded = [i for i in reached if i != 0]
    assert folded, "autograd reached parameter 0 first: nothing to check"
    before = [p.detach().clone() for p in params]
    params[0].grad = second[0].clone()           # by hand, on a parameter hooked already
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    assert opt.micro_step == 0 and all(torch.equal(a, b) for a, b in zip(params, before))
    opt.zero_grad()
    opt.step()                                   # the micro-step: first[0] and `folded`
    linear_backward(params, second)              # a clean second micro-step: the update
    opt.step()
    ref_params = [torch.nn.Parameter(p.clone()) for p in init]
    ref = AccumSGDM(ref_params, lr=0.1, momentum=0.9, accum_steps=2, backend=backend)
    linear_backward(ref_params, [first[0]] + [second[i] if i in folded else None
                                              for i in (1, 2)])
    ref.step()
    ref.zero_grad()
    linear_backward(ref_params, second)
    ref.step()
    assert opt.num_updates == ref.num_updates == 1
    for i, (a, b) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


def test_remove_hooks_restores_plain_gradients_and_frees_the_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AccumSGDM([p], accum_steps=2, fold_in_backward=True)
    opt.remove_hooks()
    (p * 2).sum().backward()
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    p.grad = None
    opt2 = AccumSGDM([p], accum_steps=2, fold_in_backward=True)
    del opt2
    gc.collect()
    (p * 2).sum().backward()  # the dropped optimizer's hook does nothing
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_hooks_survive_load_state_dict_and_cover_added_groups():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AccumAdam([p], accum_steps=2, fold_in_backward=True)
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": [q]})
    (p.sum() + q.sum()).backward()
    assert p.grad is None and q.grad is None
    assert set(opt.state[p]) >= {"exp_avg"} and set(opt.state[q]) >= {"exp_avg"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accum_steps_changed_mid_window_applies_from_the_next_in_hook_mode(backend):
    from triton_device import DEVICE, TRITON_RUNS
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("Triton cannot run here")
    device = DEVICE if backend == "triton" else "cpu"
    init, schedule = make_problem(13, [(3,), (4,)], 1, 9, missing=0.0)
    results = []
    for hook in (True, False):
        params = [torch.nn.Parameter(p.clone().float().to(device)) for p in init]
        opt = AccumAdamW(params, accum_steps=4, fold_in_backward=hook, backend=backend)
        for t, row in enumerate(schedule):
            linear_backward(params, [g.float().to(device) for g in row])
            opt.step()
            opt.zero_grad()
            if t == 1:
                for group in opt.param_groups:
                    group["accum_steps"] = 5
        assert (opt.num_updates, opt.micro_step) == (2, 0)  # windows of 4 then 5
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)
