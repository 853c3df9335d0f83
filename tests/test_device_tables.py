"""The device tables a bucket's launches read: the work table built on the device equals the
(tensor, block) list written out plainly, per dtype's block size; fold_in_backward's step()
launches only the small tensors' blocks once hooks have folded every large one (and the whole
table when a large one still has work); the per-micro-step host work reuses the tables while
the parameters keep their storage and rebuilds them when one is replaced."""
import pytest
import torch

import accumopt.kernels.tables as tables
from accumopt import AccumAdamW, AccumLion, AccumSGDM, AccumTiger
from triton_device import DEVICE, needs_triton

pytestmark = needs_triton


def plain_work(numels, block):
    """(tensor, block index) per program, in order: what the kernel's work table must hold."""
    return [(t, i) for t, n in enumerate(numels) for i in range(-(-n // block))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_device_built_work_table_is_every_block_of_every_tensor(dtype):
    block = tables.LAUNCH_SHAPES[dtype][0]
    numels = [1, block, block + 1, 3 * block - 7, 5, tables.HOOK_LAUNCH_MIN_NUMEL + 3]
    params = [torch.zeros(n, device=DEVICE, dtype=dtype) for n in numels]
    window = tables.DeviceWindow(params, [tuple(torch.zeros_like(p) for p in params)],
                                 [0] * len(params), [0.0] * len(params), (0, 0, 0, 0))
    want = plain_work(numels, block)
    assert list(zip(*window.work.tolist())) == want
    assert window.n_work == len(want)
    assert window.first_chunk == [want.index((t, 0)) for t in range(len(numels))]
    small = [(t, i) for t, i in want if numels[t] < tables.HOOK_LAUNCH_MIN_NUMEL]
    assert list(zip(*window.small_work.tolist())) == small
    assert window.large == [5]


class RecordingKernel:
    def __init__(self, kernel, programs):
        self.kernel, self.programs = kernel, programs

    def __getitem__(self, grid):
        self.programs.append(grid[0])
        return self.kernel[grid]


def test_hook_mode_step_launches_only_the_tensors_with_work(monkeypatch):
    programs = []
    monkeypatch.setattr(tables, "micro_step_kernel",
                        RecordingKernel(tables.micro_step_kernel, programs))
    big = torch.nn.Parameter(torch.randn(tables.HOOK_LAUNCH_MIN_NUMEL, device=DEVICE))
    small = [torch.nn.Parameter(torch.randn(5, device=DEVICE)) for _ in range(3)]
    opt = AccumAdamW([big] + small, lr=1e-2, accum_steps=2, backend="triton",
                     fold_in_backward=True)
    window_blocks = -(-big.numel() // tables.BLOCK) + 3
    (big.sum() + sum(p.sum() for p in small)).backward()
    opt.step()
    # The big tensor's hook launch, then step(): the 3 small tensors' blocks only.
    assert programs == [window_blocks - 3, 3], programs
    programs.clear()
    sum(p.sum() for p in small).backward()          # the big one got no gradient now:
    opt.step()                                       # on the last micro-step it must move
    assert programs == [window_blocks], programs
    opt.remove_hooks()


def test_tables_are_reused_until_a_parameter_storage_changes(monkeypatch):
    builds = []
    original = tables.DeviceWindow.__init__

    def counting(self, *args, **kwargs):
        builds.append(1)
        original(self, *args, **kwargs)
    monkeypatch.setattr(tables.DeviceWindow, "__init__", counting)
    params = [torch.nn.Parameter(torch.randn(4, device=DEVICE)) for _ in range(3)]
    opt = AccumAdamW(params, lr=1e-2, accum_steps=2, backend="triton")
    for _ in range(5):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(builds) == 1, f"{len(builds)} table builds for one set of tensors"
    with torch.no_grad():
        params[1].data = params[1].data.clone()      # new storage: the tables must follow
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(builds) == 2
    assert opt._device_windows[(0, params[0].device, torch.float32)].table[0].tolist()[1] == \
        params[1].data_ptr()


@pytest.mark.parametrize("replace_at", [1, 2, 3])
def test_hook_routes_follow_a_replaced_storage(replace_at):
    """fold_in_backward's hooks reuse their bucket's tables from one micro-step to the next;
    a parameter given a new storage between micro-steps (mid-window too) must neither be lost
    nor folded into the old storage."""
    def run(replace):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device=DEVICE))
                  for n in (tables.HOOK_LAUNCH_MIN_NUMEL, 7, 5)]
        opt = AccumAdamW(params, lr=1e-2, accum_steps=3, backend="triton", fold_in_backward=True)
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            if t == replace:
                with torch.no_grad():
                    for p in params:
                        p.data = p.data.clone()
            grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]
            sum((p * g).sum() for p, g in zip(params, grads)).backward()
            assert all(p.grad is None for p in params)
            opt.step()
        opt.remove_hooks()
        return [p.detach().clone() for p in params]

    want, got = run(None), run(replace_at)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"storage replaced at {replace_at}, param {i}: {m}")


def test_the_device_row_holds_each_micro_steps_gradients():
    """step() writes the gradient row only when its addresses changed (the caching allocator
    hands the same ones back micro-step after micro-step), and checks the addresses' alignment
    only when they differ from the last ones that passed: the device's row must still hold
    this micro-step's gradients every time (the same tensors, new ones, an absent one, a
    misaligned view as its aligned copy), and the results match the torch path."""
    def train(backend):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE))
                  for n in (5, 1030, 3)]
        grads = [torch.zeros_like(p) for p in params]
        spare = torch.zeros(1031, device=DEVICE)
        opt = AccumAdamW(params, lr=1e-2, accum_steps=3, backend=backend)
        for t in range(8):
            if t == 3:
                grads = [torch.zeros_like(p) for p in params]      # new tensors
            for i, (p, g) in enumerate(zip(params, grads)):
                g.copy_(torch.randn(g.shape, generator=gen).to(DEVICE))
                p.grad = None if (t, i) == (5, 1) else g
            if t == 6:       # a view at an odd offset, then (t = 7) the plain ones again
                spare[1:].copy_(grads[1])
                params[1].grad = spare[1:]
            opt.step()
            if backend == "triton":
                window = opt._device_windows[(0, params[0].device, torch.float32)]
                row = window.table[1].tolist()
                for i, p in enumerate(params):
                    if p.grad is None or p.grad.data_ptr() % 16 == 0:
                        want = 0 if p.grad is None else p.grad.data_ptr()
                        assert row[i] == want, f"micro-step {t}, param {i}: a stale row"
                    else:
                        assert row[i] % 16 == 0 and row[i] != p.grad.data_ptr(), \
                            f"micro-step {t}, param {i}: a misaligned address in the row"
        return params

    for i, (a, b) in enumerate(zip(train("triton"), train("torch"))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("cls,kwargs", [(AccumAdamW, {}), (AccumLion, {}), (AccumTiger, {}),
                                        (AccumSGDM, dict(momentum=0.9))],
                         ids=["AdamW", "Lion", "Tiger", "SGDM"])
def test_hook_mode_step_launches_only_the_small_tensors_in_every_family(monkeypatch, cls,
                                                                        kwargs):
    """Whatever the family's kernel folds with (Lion, Tiger and Muon fold without moving on
    the Triton path), the hooks' marks say what the optimizer did, so step() after hooks that
    folded every large tensor launches only the small tensors' blocks, micro-step after
    micro-step."""
    monkeypatch.setattr(tables, "HOOK_LAUNCH_MIN_NUMEL", 100)
    programs = []
    monkeypatch.setattr(tables, "micro_step_kernel",
                        RecordingKernel(tables.micro_step_kernel, programs))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE))
              for n in (3000, 2000, 7, 4000)]
    opt = cls(params, lr=1e-2, accum_steps=4, backend="triton", fold_in_backward=True,
              **kwargs)
    for t in range(3):                     # the window's last micro-step is left out: Lion's
        programs.clear()                   # and Tiger's run the torch path
        sum((p * torch.randn(p.shape, generator=gen).to(DEVICE)).sum()
            for p in params).backward()
        window = next(iter(opt._device_windows.values()))
        opt.step()
        assert programs[-1] == window.n_small_work == 1, (t, programs)
    opt.remove_hooks()


def test_a_group_of_two_dtypes_keeps_both_buckets_tables():
    """A param group with tensors of two dtypes has two buckets: each gets its tables once, and
    neither is rebuilt (nor its hooks' stash lost) when the other is used."""
    builds = []
    original = tables.DeviceWindow.__init__

    def counting(self, *args, **kwargs):
        builds.append(1)
        original(self, *args, **kwargs)
    results = {}
    for hook in (False, True):
        builds.clear()
        params = [torch.nn.Parameter(torch.ones(4, device=DEVICE, dtype=torch.bfloat16)),
                  torch.nn.Parameter(torch.ones(4, device=DEVICE))]
        opt = AccumSGDM(params, lr=1.0, momentum=0.0, accum_steps=2, backend="triton",
                        fold_in_backward=hook)
        tables.DeviceWindow.__init__ = counting
        try:
            for _ in range(6):
                (params[0].float().sum() + params[1].sum()).backward()
                opt.step()
                opt.zero_grad()
        finally:
            tables.DeviceWindow.__init__ = original
        assert len(builds) == 2, f"fold_in_backward={hook}: {len(builds)} table builds"
        if hook:
            opt.remove_hooks()
        results[hook] = [p.detach().float() for p in params]
    for hook, got in results.items():      # 3 windows of SGD at lr 1 on a gradient of ones
        for i, p in enumerate(got):
            assert torch.equal(p, torch.full_like(p, -2.0)), (hook, i, p)


def test_a_row_write_that_failed_is_written_on_the_retry(monkeypatch):
    """The row counts as written only once its copy is queued: a step() that failed while
    writing it (here torch.frombuffer raising) writes it on the retry."""
    p = torch.nn.Parameter(torch.zeros(8, device=DEVICE))
    opt = AccumSGDM([p], lr=1.0, momentum=0.0, accum_steps=1, backend="triton")
    p.grad = torch.ones(8, device=DEVICE)
    opt.step()
    p.grad = torch.full((8,), 2.0, device=DEVICE)

    def failing(*args, **kwargs):
        raise RuntimeError("the row could not be written")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "frombuffer", failing)
        with pytest.raises(RuntimeError, match="could not be written"):
            opt.step()
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -3.0)), p
