"""fold_in_backward on the Triton backend: launches inside backward for large gradients, up to
HOOK_GROUP of them (and fewer than HOOK_GROUP_MAX_NUMEL elements held) per launch, a stash
folded at step() (or flushed when large) for small ones; the same numbers as Triton step mode,
bit for bit, and as the torch backend."""
import inspect
import itertools

import pytest
import torch

import accumopt.kernels.tables as tables
from accumopt import AccumAdam, AccumAdamW, AccumSGDM
from triton_device import DEVICE, needs_triton

pytestmark = needs_triton
SHAPES = [(40, 30), (7,), (300,), (3, 5), (1100,), (2,)]
K = 3

VARIANTS = [
    (AccumSGDM, dict(momentum=0.9, dampening=0.2, weight_decay=0.1)),
    (AccumSGDM, dict(momentum=0.9, nesterov=True)),
    (AccumAdam, dict(weight_decay=0.1, amsgrad=True)),
    (AccumAdamW, dict(second_moment="square_of_mean", maximize=True)),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in VARIANTS]


def run(cls, kwargs, backend, hook, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]
    opt = cls(params, lr=1e-2, accum_steps=K, backend=backend, fold_in_backward=hook, **kwargs)
    for t in range(steps):
        # Parameter i takes no part when (t + i) % 4 == 3, including on windows' last steps.
        row = [None if (t + i) % 4 == 3 else torch.randn(s, generator=gen).to(DEVICE)
               for i, s in enumerate(SHAPES)]
        sum((p * g).sum() for p, g in zip(params, row) if g is not None).backward()
        if hook:
            assert all(p.grad is None for p in params), "a gradient survived backward"
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("launch_min,stash_max,group_max",
                         [(100, 1 << 30, 1 << 30), (100, 10, 1 << 30), (1, 1 << 30, 1 << 30),
                          (1, 1 << 30, 400)],
                         ids=["launch-and-stash", "with-flushes", "launch-all",
                              "groups-by-size"])
def test_triton_hook_mode_equals_step_mode(monkeypatch, cls, kwargs, launch_min, stash_max,
                                           group_max):
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", launch_min)
    monkeypatch.setattr(tables, "STASH_MAX_NUMEL", stash_max)
    monkeypatch.setattr(tables, "HOOK_GROUP_MAX_NUMEL", group_max)
    hooked, hook_opt = run(cls, kwargs, "triton", hook=True)
    stepped, step_opt = run(cls, kwargs, "triton", hook=False)
    reference, _ = run(cls, kwargs, "torch", hook=False)
    assert (hook_opt.num_updates, hook_opt.micro_step) == (step_opt.num_updates,
                                                           step_opt.micro_step)
    for i, (a, b, r) in enumerate(zip(hooked, stepped, reference)):
        assert torch.equal(a, b), f"param {i} {tuple(a.shape)}: hook mode differs from step mode"
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} vs the torch backend: {m}")


def record_launches(monkeypatch, label):
    """Record ``label(HOOK)`` for every launch of the micro-step kernel (a hook's launch, or
    a step's / flush's); returns the list it fills."""
    calls = []
    kernel = tables.micro_step_kernel
    hook = kernel.arg_names.index("HOOK")

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(label(args[hook]))
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(tables, "micro_step_kernel", Recording())
    return calls


def record_hook_groups(monkeypatch, numels):
    """For every launch of the micro-step kernel, the tensors it folds by their hooks' gradients
    (the HOOK launch's tensor indices, as many as its ends say it covers) or "step" (a launch of
    the gradient row); checks that a hook launch's grid is its tensors' blocks."""
    calls = []
    kernel = tables.micro_step_kernel
    names = kernel.arg_names

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                arg = dict(zip(names, args))
                if not arg["HOOK"]:
                    calls.append("step")
                else:
                    # (the last tensor's blocks end with the grid, whatever its slot's end says)
                    ends = [min(arg[f"hook_end{i}"], grid[0])
                            for i in range(tables.HOOK_GROUP - 1)] + [grid[0]]
                    n = 1 + sum(end < grid[0] for end in ends[:-1])
                    tensors = [arg[f"hook_t{i}"] for i in range(n)]
                    assert ends[:n] == list(itertools.accumulate(
                        -(-numels[t] // tables.BLOCK) for t in tensors))
                    calls.append(tuple(tensors))
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(tables, "micro_step_kernel", Recording())
    return calls


GROUP_SHAPES = [(1200,), (5,), (3000,), (1500,), (7,), (1100,), (2500,), (1300,), (3,),
                (4000,), (1000,)]


@pytest.mark.parametrize("group_max", [1 << 30, 4000, 1])
def test_hook_launches_group_the_large_gradients(monkeypatch, group_max):
    """The first large gradient of the first micro-step launches by itself, through the
    launcher; every later one (in later micro-steps, with the same hyperparameters, from the
    first) is held until HOOK_GROUP of them are, or they add up to HOOK_GROUP_MAX_NUMEL
    elements, then launched together; step() launches what is still held, then the small ones.
    Checked against the rule applied by hand to the order the hooks ran in, and the held
    gradients' bound after every hook."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 1000)
    monkeypatch.setattr(tables, "HOOK_GROUP_MAX_NUMEL", group_max)
    numels = [s[0] for s in GROUP_SHAPES]
    calls = record_hook_groups(monkeypatch, numels)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in GROUP_SHAPES]
    opt = AccumAdamW(params, accum_steps=2, backend="triton", fold_in_backward=True)
    order, held = [], []

    def after_the_fold(param):       # registered after the optimizer's hook: runs after it
        window = next(iter(opt._device_windows.values()))
        held.append((len(window.held), window.held_numel))
        order.append(next(t for t, p in enumerate(params) if p is param))
    for p in params:
        p.register_post_accumulate_grad_hook(after_the_fold)
    for micro_step in range(4):
        calls.clear()
        order.clear()
        held.clear()
        sum(p.sum() for p in params).backward()
        in_backward = list(calls)
        opt.step()
        large = [t for t in order if numels[t] >= 1000]
        # the rule, by hand
        want_backward, group, size = ([(large[0],)], [], 0) if micro_step == 0 else ([], [], 0)
        for t in large[1:] if micro_step == 0 else large:
            group.append(t)
            size += numels[t]
            if len(group) == tables.HOOK_GROUP or size >= group_max:
                want_backward.append(tuple(group))
                group, size = [], 0
        want_step = [tuple(group)] if group else []
        assert in_backward == want_backward, (micro_step, in_backward, want_backward)
        assert calls[len(in_backward):] == want_step + ["step"], (micro_step, calls)
        assert all(n < tables.HOOK_GROUP and size < group_max for n, size in held), held
    opt.remove_hooks()


def test_hook_launch_arguments_are_built_once_while_the_hyperparameters_stay(monkeypatch):
    """The first large hook of the first micro-step builds the hook launch arguments through
    the launcher (and launches its tensor alone); every later large hook, in that micro-step
    and the next ones, is held and launched with them (DeviceWindow.take_hooked, launch_held),
    with no pass through the launcher, until a hyperparameter changes: then the first large
    hook builds them again."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 1000)
    through_launcher = []
    original = tables.DeviceWindow._launch
    hook_tensor = list(inspect.signature(original).parameters).index("hook_tensor") - 1

    def counting(self, *args):
        through_launcher.append(args[hook_tensor] is not None)    # a hook's launch
        return original(self, *args)
    monkeypatch.setattr(tables.DeviceWindow, "_launch", counting)
    launches = record_launches(monkeypatch, bool)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]
    opt = AccumAdamW(params, accum_steps=2, backend="triton", fold_in_backward=True)
    large = sum(p.numel() >= 1000 for p in params)
    assert 2 <= large <= tables.HOOK_GROUP
    for t in range(5):
        if t == 2:            # (a window's first micro-step)
            opt.param_groups[0]["lr"] *= 0.5
        through_launcher.clear()
        launches.clear()
        sum(p.sum() for p in params).backward()
        built = t in (0, 2)
        assert through_launcher == [True] * built, (t, through_launcher)
        assert launches == [True] * built, (t, launches)
        opt.step()
        # step(): the held large ones (all but one that launched alone), then the step's
        assert launches == [True] * built + [True, False], (t, launches)
    opt.remove_hooks()


def test_hyperparameters_changed_between_windows_reach_the_hook_launches(monkeypatch):
    """The arguments a hook launch reuses live for one micro-step: an lr or betas changed
    between windows moves the next window's parameters as in step mode and on the torch path."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)

    def train(backend, hook):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]
        opt = AccumAdam(params, lr=1e-2, accum_steps=2, backend=backend,
                        fold_in_backward=hook)
        for t in range(8):
            if t % 2 == 0 and t:
                opt.param_groups[0]["lr"] *= 0.5
                opt.param_groups[0]["betas"] = (0.8 + t / 100, 0.99)
            grads = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]
            sum((p * g).sum() for p, g in zip(params, grads)).backward()
            opt.step()
            opt.zero_grad()
        if hook:
            opt.remove_hooks()
        return params

    hooked, stepped = train("triton", True), train("triton", False)
    reference = train("torch", False)
    for i, (a, b, r) in enumerate(zip(hooked, stepped, reference)):
        assert torch.equal(a, b), f"param {i}: hook mode differs from step mode"
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} vs the torch backend: {m}")


def test_a_misaligned_gradient_of_a_later_hook_reaches_the_kernel_as_an_aligned_copy(
        monkeypatch):
    """A large gradient the hook's short way cannot take (here a view at an odd offset; in
    backward a gradient hook may hand over anything) goes the full way: an aligned copy,
    folded with the same result as the torch path."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 16)

    def train(backend, misaligned):
        params = [torch.nn.Parameter(torch.linspace(-1, 1, n).to(DEVICE)) for n in (33, 40)]
        opt = AccumAdamW(params, lr=0.1, accum_steps=2, backend=backend,
                         fold_in_backward=True)
        hooks = [next(iter(p._post_accumulate_grad_hooks.values())) for p in params]
        for t in range(4):
            with torch.no_grad():
                for i, (p, hook) in enumerate(zip(params, hooks)):
                    buf = torch.arange(p.numel() + 1, dtype=torch.float32,
                                       device=DEVICE) / 10 + t + i
                    p.grad = buf[1:] if misaligned else buf[1:].clone()
                    assert (p.grad.data_ptr() % 16 != 0) == misaligned
                    hook(p)          # as autograd calls it once the gradient is final
                    assert p.grad is None
            opt.step()
        opt.remove_hooks()
        return [p.detach().clone() for p in params]

    want = train("torch", False)
    for misaligned in (False, True):
        for i, (a, b) in enumerate(zip(train("triton", misaligned), want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"misaligned={misaligned}, param {i}: {m}")


def test_a_group_of_two_dtypes_folds_the_same_in_hook_and_step_mode(monkeypatch):
    """Two buckets in one param group (fp32 and bf16 tensors): each bucket's hooks fold into its
    own window and neither window's stash is lost when the other is used."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)

    def train(hook):
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype))
                  for s, dtype in zip(SHAPES, [torch.float32, torch.bfloat16] * 3)]
        opt = AccumAdamW(params, lr=1e-2, accum_steps=K, backend="triton",
                         fold_in_backward=hook)
        for t in range(2 * K + 1):
            grads = [torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params]
            sum((p * g).float().sum() for p, g in zip(params, grads)).backward()
            opt.step()
            opt.zero_grad()
        if hook:
            opt.remove_hooks()
        return params

    for i, (a, b) in enumerate(zip(train(True), train(False))):
        assert torch.equal(a, b), f"param {i} ({a.dtype}): hook mode differs from step mode"


@pytest.mark.filterwarnings("ignore:the lr of param group")
@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=IDS)
def test_hyperparameters_changed_between_backward_and_step_apply_from_the_next_micro_step(
        monkeypatch, cls, kwargs):
    """On a window's last micro-step the hooks move the large tensors inside backward and
    step() the stashed small ones: an lr (or betas, momentum) changed in between must move
    them all alike. The micro-step keeps what its first hook read, as the torch backend's hooks
    do; the reference is step mode with the change made after step()."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)

    def train(backend, hook):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]
        opt = cls(params, lr=1e-2, accum_steps=2, backend=backend, fold_in_backward=hook,
                  **kwargs)
        for t in range(6):
            grads = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]
            sum((p * g).sum() for p, g in zip(params, grads)).backward()
            change = t % 2 == 1            # the window's last micro-step
            if change and hook:
                opt.param_groups[0]["lr"] *= 0.5
            opt.step()    # (in hook mode it warns: the lr changed inside the window)
            if change and not hook:
                opt.param_groups[0]["lr"] *= 0.5
            opt.zero_grad()
        return params

    hooked, reference = train("triton", True), train("torch", False)
    torch_hooked = train("torch", True)
    for i, (a, b, c) in enumerate(zip(hooked, reference, torch_hooked)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"torch backend, param {i}: {m}")
