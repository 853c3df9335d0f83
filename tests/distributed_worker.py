"""What each rank of test_distributed.py runs (in its own process, gloo on loopback)."""
import os

import torch
import torch.distributed as dist

from accumopt import AccumAdam, AccumAdamW, AccumLion, AccumMuon, AccumSGDM, AccumTiger

SHAPES = [(3, 2), (5,), (4,)]
K, WINDOWS = 2, 2
SCENARIOS = {
    "sgdm": (AccumSGDM, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)),
    "sgdm-sum": (AccumSGDM, dict(lr=0.1, momentum=0.9, accum_reduction="sum")),
    "sgd-nesterov": (AccumSGDM, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "adam-mean_of_squares": (AccumAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adamw-mean_of_squares-sum": (AccumAdamW, dict(lr=1e-2, accum_reduction="sum")),
    "adamw-square_of_mean": (AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean")),
    # max_grad_norm clips the window averaged across ranks.
    "sgd-nesterov-clipped": (AccumSGDM, dict(lr=0.1, momentum=0.9, nesterov=True,
                                             max_grad_norm=0.5)),
    "adamw-square_of_mean-clipped": (AccumAdamW, dict(lr=1e-2, second_moment="square_of_mean",
                                                      max_grad_norm=0.5)),
    "tiger": (AccumTiger, dict(lr=1e-2, weight_decay=0.1)),
    "lion": (AccumLion, dict(lr=1e-2, weight_decay=0.1)),
    "muon": (AccumMuon, dict(lr=2e-2)),
    "muon-no-nesterov": (AccumMuon, dict(lr=2e-2, nesterov=False)),
}
MATRIX_SHAPES = [(3, 2), (4, 3), (2, 2)]   # Muon takes matrices only


# backend="triton" (the interpreter on the CPU), float32: the kernels fold every micro-step
# (fold only on the last), the window state is averaged in place in flat buffers, then moved.
TRITON_SCENARIOS = ["sgdm", "sgd-nesterov", "adam-mean_of_squares", "adamw-square_of_mean",
                    "sgd-nesterov-clipped", "adamw-square_of_mean-clipped", "tiger", "lion"]


def shapes_of(name):
    return MATRIX_SHAPES if name.startswith("muon") else SHAPES


def schedule(world_size, seed=0, shapes=SHAPES, dtype=torch.float64):
    """grads[window][rank][t][i]: parameter i's gradient on rank's micro-step t, or None.
    Parameter 2 gets no gradient anywhere in window 0 (DDP's unused parameter)."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = []
    for w in range(WINDOWS):
        grads.append([[[None if (i == 2 and w == 0) or (i == 1 and (r + t) % 3 == 1)
                        else torch.randn(s, generator=gen, dtype=dtype)
                        for i, s in enumerate(shapes)] for t in range(K)]
                      for r in range(world_size)])
    return init, grads


def run_scenario(rank, world_size, cls, kwargs, hook, shapes=SHAPES, backend="auto",
                 dtype=torch.float64):
    init, grads = schedule(world_size, shapes=shapes, dtype=dtype)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, accum_steps=K, fold_in_backward=hook, process_group=dist.group.WORLD,
              backend=backend, **kwargs)
    snapshots, on_triton = [], False
    for w in range(WINDOWS):
        for t in range(K):
            row = grads[w][rank][t]
            loss = sum((p * g).sum() for p, g in zip(params, row) if g is not None)
            if torch.is_tensor(loss):
                loss.backward()
            on_triton = on_triton or bool(opt._device_windows)
            opt.step()
            opt.zero_grad()
        assert opt.updated
        snapshots.append([p.detach().clone() for p in params])
    opt.remove_hooks()
    if backend == "triton":
        assert on_triton, "the Triton path did not run"
    return snapshots


def run_ddp(rank, world_size):
    """DDP with every micro-step under no_sync(): the optimizer averages the window."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = model.double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = AccumAdamW(ddp.parameters(), lr=1e-2, accum_steps=K, second_moment="square_of_mean",
                     process_group=dist.group.WORLD)
    for x, y in ddp_batches(world_size)[rank]:
        with ddp.no_sync():
            torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def run_step_per_window(rank, world_size):
    """step_per_window with process_group, without DDP: the framework-style loop (loss / K per
    backward, step() after K) averages the window across ranks."""
    init, grads = schedule(world_size, seed=3)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AccumSGDM(params, lr=0.1, momentum=0.9, accum_steps=K, fold_in_backward=True,
                    step_per_window=True, process_group=dist.group.WORLD)
    for w in range(WINDOWS):
        for t in range(K):
            row = grads[w][rank][t]
            loss = sum((p * g).sum() for p, g in zip(params, row) if g is not None)
            if torch.is_tensor(loss):
                (loss / K).backward()
        opt.step()
    opt.remove_hooks()
    return [p.detach().clone() for p in params]


def ddp_batches(world_size):
    gen = torch.Generator().manual_seed(5)
    return [[(torch.randn(3, 4, generator=gen, dtype=torch.float64),
              torch.randn(3, 2, generator=gen, dtype=torch.float64))
             for _ in range(K * WINDOWS)] for _ in range(world_size)]


def expect_error(fn):
    try:
        fn()
    except RuntimeError as err:
        return str(err)
    return None


def worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for name, (cls, kwargs) in SCENARIOS.items():
        for hook in (False, True):
            results[(name, hook)] = run_scenario(rank, world_size, cls, kwargs, hook,
                                                 shapes_of(name))
    for name in TRITON_SCENARIOS:
        cls, kwargs = SCENARIOS[name]
        for hook in (False, True):
            for backend in ("torch", "triton"):
                try:
                    results[(backend + "-fp32", name, hook)] = run_scenario(
                        rank, world_size, cls, kwargs, hook, SHAPES, backend, torch.float32)
                except Exception as err:     # reported by the test, not a hang
                    results[(backend + "-fp32", name, hook)] = f"{type(err).__name__}: {err}"
    results["ddp"] = run_ddp(rank, world_size)

    def mismatched_accum_steps():
        p = torch.nn.Parameter(torch.ones(3))
        opt = AccumSGDM([p], accum_steps=2 + rank, process_group=dist.group.WORLD)
        for _ in range(2 + rank):
            p.grad = torch.ones(3)
            opt.step()
    results["mismatched accum_steps"] = expect_error(mismatched_accum_steps)

    def fold_in_backward_under_ddp():
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        opt = AccumSGDM(ddp.parameters(), accum_steps=2, fold_in_backward=True)
        before = [p.detach().clone() for p in ddp.parameters()]
        try:
            ddp(torch.ones(2, 3)).sum().backward()
        finally:
            folded = any(s.get("window_folds") for s in opt.state.values())
            assert not folded and all(torch.equal(a, b) for a, b in
                                      zip(before, ddp.parameters())), "a local gradient folded"
            opt.remove_hooks()
    results["fold_in_backward under DDP"] = expect_error(fold_in_backward_under_ddp)
    results["step_per_window"] = run_step_per_window(rank, world_size)

    def different_params():
        AccumSGDM([torch.nn.Parameter(torch.full((3,), float(rank)))],
                  process_group=dist.group.WORLD)
    results["different params"] = expect_error(different_params)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
