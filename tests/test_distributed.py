"""process_group: each rank folds its own micro-batches, the window is averaged across ranks on
the update step, in step and fold_in_backward modes. Two and three CPU ranks on gloo (loopback):
the ranks end bitwise equal and equal one process running all ranks' micro-batches as one window
(torch.optim on Ḡ for the exact variants, Su's rule written out for mean_of_squares, Tiger's and
Lion's rules on Ḡ written out), with DDP's
semantics for a parameter no rank touched (a zero gradient). DDP + no_sync gives the same; ranks
that disagree on accum_steps or start from different parameters get a clear error."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accumopt.backend import triton_can_run
from distributed_worker import (K, SCENARIOS, TRITON_SCENARIOS, WINDOWS, ddp_batches, schedule,
                                shapes_of, worker)
from reference import lion_on_mean, su_mean_of_squares, tiger_on_mean

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
TORCH_REFERENCE = {"sgdm": torch.optim.SGD, "sgdm-sum": torch.optim.SGD,
                   "sgd-nesterov": torch.optim.SGD, "adamw-square_of_mean": torch.optim.AdamW,
                   "sgd-nesterov-clipped": torch.optim.SGD,
                   "adamw-square_of_mean-clipped": torch.optim.AdamW}
if hasattr(torch.optim, "Muon"):
    TORCH_REFERENCE.update({"muon": torch.optim.Muon, "muon-no-nesterov": torch.optim.Muon})

# The families with no torch.optim class: their rule on the window gradient, written out (every
# parameter stepped, on a zero gradient where no rank gave it one: DDP's semantics).
PLAIN_REFERENCE = {"tiger": tiger_on_mean, "lion": lion_on_mean}
PLAIN_FLAGS = {"tiger": dict(beta=0.965, lr_scale="rms"), "lion": dict(betas=(0.9, 0.99))}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"ranks{world_size}")
    mp.spawn(worker, args=(world_size, free_port(), str(out)), nprocs=world_size, join=True)
    return world_size, [torch.load(out / f"rank{r}.pt", weights_only=False)
                        for r in range(world_size)]


def single_process_windows(world_size, name=""):
    """All ranks' micro-batches of a window as one window of world_size * K micro-batches, every
    parameter given a gradient (zeros where no micro-batch had one)."""
    init, grads = schedule(world_size, shapes=shapes_of(name))
    flat = [[row for rank_rows in window for row in rank_rows] for window in grads]
    return init, flat


def torch_reference(world_size, cls, kwargs, name=""):
    init, windows = single_process_windows(world_size, name)
    reduction = kwargs.get("accum_reduction", "mean")
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, **{k: v for k, v in kwargs.items()
                         if k not in ("accum_reduction", "second_moment", "max_grad_norm")})
    out = []
    for window in windows:
        for i, p in enumerate(params):
            total = sum(row[i] if row[i] is not None else torch.zeros_like(p) for row in window)
            p.grad = total / len(window) if reduction == "mean" else total
        if kwargs.get("max_grad_norm") is not None:
            torch.nn.utils.clip_grad_norm_(params, kwargs["max_grad_norm"])
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("hook", [False, True], ids=["step-mode", "hook-mode"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_equal_one_process_running_all_micro_batches(ranks, name, hook):
    world_size, results = ranks
    got = [r[(name, hook)] for r in results]
    for rank in range(1, world_size):
        for w in range(WINDOWS):
            for i, (a, b) in enumerate(zip(got[rank][w], got[0][w])):
                assert torch.equal(a, b), f"rank {rank} differs from rank 0: window {w}, param {i}"
    cls, kwargs = SCENARIOS[name]
    if name in TORCH_REFERENCE:
        want = torch_reference(world_size, TORCH_REFERENCE[name], kwargs, name)
    elif name.startswith("muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    elif name in PLAIN_REFERENCE:
        init, windows = single_process_windows(world_size)
        rows = [[g if g is not None else torch.zeros_like(p) for g, p in zip(row, init)]
                for window in windows for row in window]
        want = [theta for theta, _ in PLAIN_REFERENCE[name](
            init, rows, world_size * K, **PLAIN_FLAGS[name], **kwargs)]
    else:
        init, windows = single_process_windows(world_size)
        flags = {k: kwargs.get(k, d) for k, d in (("weight_decay", 0.0), ("amsgrad", False))}
        if cls.__name__ == "AccumAdamW":
            flags["weight_decay"] = kwargs.get("weight_decay", 1e-2)
        want = [theta for theta, _, _ in su_mean_of_squares(
            init, [row for window in windows for row in window], world_size * K,
            lr=kwargs["lr"], betas=(0.9, 0.999), eps=1e-8, maximize=False,
            decoupled_weight_decay=cls.__name__ == "AccumAdamW",
            reduction=kwargs.get("accum_reduction", "mean"), skip_untouched=False, **flags)]
    for w in range(WINDOWS):
        for i, (a, b) in enumerate(zip(got[0][w], want[w])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"window {w}, param {i}: {m}")


@pytest.mark.skipif(not triton_can_run([torch.zeros(1)]), reason="Triton cannot run here")
@pytest.mark.parametrize("hook", [False, True], ids=["step-mode", "hook-mode"])
@pytest.mark.parametrize("name", TRITON_SCENARIOS)
def test_the_triton_path_averages_the_window_as_the_torch_path(ranks, name, hook):
    """backend="triton" with a process group: the kernels fold, the flat window state is
    all-reduced in place, the kernels move; every rank ends bitwise equal, and equal to the torch
    path in float32."""
    world_size, results = ranks
    got = [r[("triton-fp32", name, hook)] for r in results]
    want = [r[("torch-fp32", name, hook)] for r in results]
    for rank, (a, b) in enumerate(zip(got, want)):
        assert not isinstance(a, str), f"rank {rank}: the Triton run raised {a}"
        assert not isinstance(b, str), f"rank {rank}: the torch run raised {b}"
    for rank in range(1, world_size):
        for w in range(WINDOWS):
            for i, (a, b) in enumerate(zip(got[rank][w], got[0][w])):
                assert torch.equal(a, b), f"rank {rank} differs from rank 0: window {w}, param {i}"
    for w in range(WINDOWS):
        for i, (a, b) in enumerate(zip(got[0][w], want[0][w])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: window {w}, param {i}: {m}")


def test_ddp_with_no_sync_equals_one_process(ranks):
    world_size, results = ranks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = ddp_batches(world_size)
    for w in range(WINDOWS):
        for rank in range(world_size):
            for x, y in batches[rank][w * K:(w + 1) * K]:
                (torch.nn.functional.mse_loss(model(x), y) / (world_size * K)).backward()
        opt.step()
        opt.zero_grad()
    for rank in range(world_size):
        for a, b in zip(results[rank]["ddp"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


def test_mismatched_configurations_get_a_clear_error_on_every_rank(ranks):
    world_size, results = ranks
    for rank, result in enumerate(results):
        assert "accum_steps" in (result["mismatched accum_steps"] or ""), rank
        assert "differ" in (result["different params"] or ""), rank


def test_fold_in_backward_under_ddp_is_refused_on_every_rank_before_any_fold(ranks):
    world_size, results = ranks
    for rank, result in enumerate(results):
        message = result["fold in backward under DDP"] if "fold in backward under DDP" in \
            result else result["fold_in_backward under DDP"]
        assert message and "DistributedDataParallel" in message, (rank, message)
        assert "process_group" in message, message


def test_step_per_window_with_a_process_group_equals_one_process(ranks):
    world_size, results = ranks
    init, grads = schedule(world_size, seed=3)
    flat = [[row for rank_rows in window for row in rank_rows] for window in grads]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    ref = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for window in flat:
        for i, p in enumerate(params):
            p.grad = sum(torch.zeros_like(p) if row[i] is None else row[i] for row in window)
            p.grad /= len(window)
        ref.step()
    for rank, result in enumerate(results):
        for i, (a, b) in enumerate(zip(result["step_per_window"], params)):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"rank {rank}, param {i}: {m}")
