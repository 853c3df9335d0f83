"""Sharded training (FSDP2): fully_shard float64 models on 2 and 3 CPU gloo ranks.

- Exact variants, in step mode, fold_in_backward and step_per_window, equal torch.optim on the
  same FSDP2 model with standard accumulation, both with a reduce-scatter every micro-step and
  with set_requires_gradient_sync(False) until the last one (both references are checked against
  each other and against one process on the global batch).
- mean_of_squares equals Su's rule written out, each micro-batch's estimate being that
  micro-step's reduce-scattered (rank-averaged) gradient.
- Window clipping equals clip_grad_norm_ on the accumulated .grad, and grad_norm its return.
- fold_in_backward frees every sharded gradient (p.grad is None after each backward).
- backend="triton": the kernels run on each rank's local shards (float32 model): every exact
  variant and window clipping equal torch.optim on the same model, mean_of_squares equals the
  torch path, in every mode.
- A tied embedding / head weight under nested wrapping and a mixed-precision policy (bf16
  compute, fp32 reduce) equals torch.optim on the same model, both references, both backends.
- torch.distributed.checkpoint's standard recipe resumes exactly mid-window and at a boundary,
  and a 2-rank boundary checkpoint loads on 3 ranks and continues as the 2-rank run did.

The ranks are spawned once per world size (the 3-rank run loads the 2-rank run's checkpoints);
each scenario's exception comes back as a string and fails only its own test."""
import functools
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fsdp2_worker as W
from accumopt.backend import triton_can_run
from reference import su_mean_of_squares

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
RTOL, ATOL = 1e-9, 1e-12
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6     # float32 models: the kernels' operation order differs
needs_triton = pytest.mark.skipif(not triton_can_run([torch.zeros(1)]),
                                  reason="Triton cannot run here (not installed, or no GPU and "
                                         "TRITON_INTERPRET unset)")
SPAWN_DEADLINE_S = 300
REFERENCES = {False: "reduce-every-micro-step", True: "no-sync-until-last"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world_size, out_dir, reshard_from=None):
    context = mp.spawn(W.worker, args=(world_size, free_port(), str(out_dir), reshard_from),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{world_size} ranks did not finish within {SPAWN_DEADLINE_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2-ranks2")
    return 2, spawn(2, out), out


@pytest.fixture(scope="module")
def run3(run2, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2-ranks3")
    return 3, spawn(3, out, reshard_from=str(run2[2])), out


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request):
    world_size, results, _ = request.getfixturevalue(f"run{request.param}")
    return world_size, results


def ok(result, what):
    if isinstance(result, str):
        pytest.fail(f"{what} raised: {result}", pytrace=False)
    return result


def assert_params_close(got, want, what, rtol=RTOL, atol=ATOL):
    assert len(got) == len(want), f"{what}: {len(got)} tensors vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}, param {i}: {m}")


def assert_windows_close(got, want, what, rtol=RTOL, atol=ATOL):
    assert len(got) == len(want), f"{what}: {len(got)} windows vs {len(want)}"
    for w, (a, b) in enumerate(zip(got, want)):
        assert_params_close(a, b, f"{what}, window {w}", rtol, atol)


# ----- single-process references on the global batch ----------------------------------------

def global_grads(model, i):
    model.zero_grad()
    x, y = W.DOUBLE.global_batch(i)
    W.DOUBLE.loss(model, x, y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@functools.lru_cache(maxsize=None)
def plain_torch(torch_cls, kwargs_items, clip=None):
    """torch.optim, one process, the global batch: loss / K per micro-step, step() after K."""
    model = W.DOUBLE.plain()
    opt = torch_cls(model.parameters(), **dict(kwargs_items))
    snapshots, norms = [], []
    for i in range(W.WINDOWS * W.K):
        x, y = W.DOUBLE.global_batch(i)
        (W.DOUBLE.loss(model, x, y) / W.K).backward()
        if (i + 1) % W.K == 0:
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).clone())
            opt.step()
            opt.zero_grad()
            snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots, norms


@functools.lru_cache(maxsize=None)
def su_reference():
    """Su's rule (tests/reference.py) per window, each micro-batch's estimate the global batch's
    gradient at that window's parameters: what the rank-averaged shard of every micro-step is."""
    cls, kwargs = W.MEAN_OF_SQUARES
    assert cls.__name__ == "AccumAdamW" and set(kwargs) == {"lr"}
    model = W.DOUBLE.plain()
    theta = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    snapshots = []
    for w in range(W.WINDOWS):
        with torch.no_grad():
            for p, t in zip(model.parameters(), theta):
                p.copy_(t)
        rows = [global_grads(model, w * W.K + t) for t in range(W.K)]
        [(theta, m, v)] = su_mean_of_squares(
            theta, rows, W.K, lr=kwargs["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
            decoupled_weight_decay=True, amsgrad=False, maximize=False,
            start=(theta, m, v, [torch.zeros_like(p) for p in theta], [w] * len(theta)))
        snapshots.append([t.clone() for t in theta])
    return snapshots


def torch_kwargs_of(name):
    if name == "clipped":
        return W.CLIPPED[2], tuple(sorted(W.CLIPPED[3].items()))
    _, _, torch_cls, torch_kwargs = W.EXACT[name]
    return torch_cls, tuple(sorted(torch_kwargs.items()))


# ----- the references are right --------------------------------------------------------------

@pytest.mark.parametrize("name", [*W.EXACT, "clipped"])
def test_torch_standard_accumulation_on_fsdp2_agrees_both_ways_and_with_one_process(ranks,
                                                                                     name):
    world_size, results = ranks
    torch_cls, items = torch_kwargs_of(name)
    clip = W.MAX_NORM if name == "clipped" else None
    want, want_norms = plain_torch(torch_cls, items, clip)
    for rank, result in enumerate(results):
        every = ok(result[("torch", name, False)], f"rank {rank}: torch.optim reference (a)")
        no_sync = ok(result[("torch", name, True)], f"rank {rank}: torch.optim reference (b)")
        assert_windows_close(every["params"], no_sync["params"], f"rank {rank}: (a) vs (b)")
        assert_windows_close(every["params"], want, f"rank {rank}: (a) vs one process")
        for w, (a, b, c) in enumerate(zip(every["norms"], no_sync["norms"], want_norms)):
            torch.testing.assert_close(a, c, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}: (a) norm, window {w}: {m}")
            torch.testing.assert_close(b, c, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}: (b) norm, window {w}: {m}")
    if clip is not None:
        assert len(want_norms) == W.WINDOWS
        assert all(n > clip for n in want_norms), f"clipping must be active: norms {want_norms}"


def test_su_reference_differs_from_square_of_mean():
    """The mean_of_squares test is not vacuous: Su's rule moves differently from AdamW."""
    adamw = plain_torch(torch.optim.AdamW, (("lr", 1e-2),))[0]
    diff = max((a - b).abs().max().item() for a, b in zip(su_reference()[-1], adamw[-1]))
    assert diff > 1e-6, diff


# ----- scenario 1: every mode equals torch.optim on the same FSDP2 model ------------------------

@pytest.mark.parametrize("no_sync", list(REFERENCES), ids=list(REFERENCES.values()))
@pytest.mark.parametrize("mode", list(W.MODES))
@pytest.mark.parametrize("name", list(W.EXACT))
def test_exact_variants_equal_torch_optim_standard_accumulation(ranks, name, mode, no_sync):
    world_size, results = ranks
    for rank, result in enumerate(results):
        ref = ok(result[("torch", name, no_sync)], f"rank {rank}: torch.optim reference")
        got = ok(result[("accum", name, mode)], f"rank {rank}: accumopt {name} in {mode} mode")
        assert got["updated"] == [(True, w + 1) for w in range(W.WINDOWS)], got["updated"]
        assert_windows_close(got["params"], ref["params"], f"rank {rank}: {name} {mode}")


@pytest.mark.parametrize("mode", list(W.MODES))
def test_mean_of_squares_equals_su_rule_on_rank_averaged_micro_step_gradients(ranks, mode):
    world_size, results = ranks
    want = su_reference()
    for rank, result in enumerate(results):
        got = ok(result[("accum", "adamw-mean_of_squares", mode)],
                 f"rank {rank}: AccumAdamW mean_of_squares in {mode} mode")
        assert_windows_close(got["params"], want, f"rank {rank}: mean_of_squares {mode}")


# ----- scenario 2: window clipping -----------------------------------------------------------

@pytest.mark.parametrize("no_sync", list(REFERENCES), ids=list(REFERENCES.values()))
@pytest.mark.parametrize("mode", list(W.MODES))
def test_window_clipping_equals_clip_grad_norm_on_accumulated_grad(ranks, mode, no_sync):
    world_size, results = ranks
    for rank, result in enumerate(results):
        ref = ok(result[("torch", "clipped", no_sync)], f"rank {rank}: clipped reference")
        got = ok(result[("accum", "clipped", mode)], f"rank {rank}: clipped {mode} mode")
        assert_windows_close(got["params"], ref["params"], f"rank {rank}: clipped {mode}")
        assert len(got["norms"]) == len(ref["norms"]) == W.WINDOWS
        for w, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
            assert torch.is_tensor(a) and a.dim() == 0, f"grad_norm {a!r} is not a 0-d tensor"
            torch.testing.assert_close(a.to(b.dtype), b, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}: grad_norm, window {w}: {m}")


@pytest.mark.parametrize("name", list(W.EXACT))
def test_framework_loop_under_fsdp2_no_sync_stays_exact(ranks, name):
    """Accelerate's FSDP2 accumulation (set_requires_gradient_sync(False) until the last
    backward): the hooks see only the last backward's reduce-scattered window sum, so an exact
    variant still equals torch.optim (README: nothing is saved then; use sync_each_batch)."""
    world_size, results = ranks
    for rank, result in enumerate(results):
        ref = ok(result[("torch", name, True)], f"rank {rank}: torch.optim reference")
        got = ok(result[("accum-no-sync", name)], f"rank {rank}: {name} under no-sync")
        assert got["updated"] == [(True, w + 1) for w in range(W.WINDOWS)], got["updated"]
        assert_windows_close(got["params"], ref["params"], f"rank {rank}: {name} no-sync")


# ----- scenario 3: fold_in_backward frees the sharded gradients ------------------------------

@pytest.mark.parametrize("mode", ["fold", "window"])
@pytest.mark.parametrize("name", [*W.EXACT, "adamw-mean_of_squares", "clipped"])
def test_fold_in_backward_leaves_no_grad_after_backward(ranks, name, mode):
    world_size, results = ranks
    for rank, result in enumerate(results):
        got = ok(result[("accum", name, mode)], f"rank {rank}: accumopt {name} in {mode} mode")
        seen = got["grads_after_backward"]
        assert len(seen) == W.WINDOWS * W.K
        for i, names in enumerate(seen):
            assert not names, f"rank {rank}, micro-step {i}: p.grad kept after backward: {names}"


# ----- scenario 4: the Triton kernels on local shards ----------------------------------------

def assert_ran_triton(got, what):
    assert got["triton_buckets"] and all(n > 0 for n in got["triton_buckets"]), (
        f"{what}: the Triton path did not run every micro-step (device windows per micro-step: "
        f"{got['triton_buckets']})")


@needs_triton
@pytest.mark.parametrize("mode", list(W.MODES))
@pytest.mark.parametrize("name", [*W.EXACT, "clipped"])
def test_triton_on_local_shards_equals_torch_optim(ranks, name, mode):
    world_size, results = ranks
    for rank, result in enumerate(results):
        ref = ok(result[("torch-fp32", name)], f"rank {rank}: float32 torch.optim reference")
        got = ok(result[("triton", name, mode)], f"rank {rank}: Triton {name} in {mode} mode")
        assert_ran_triton(got, f"rank {rank}: {name} {mode}")
        assert got["updated"] == [(True, w + 1) for w in range(W.WINDOWS)], got["updated"]
        assert_windows_close(got["params"], ref["params"], f"rank {rank}: Triton {name} {mode}",
                             FP32_RTOL, FP32_ATOL)
        for w, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
            torch.testing.assert_close(a.to(b.dtype), b, rtol=FP32_RTOL, atol=FP32_ATOL,
                                       msg=lambda m: f"rank {rank}: grad_norm, window {w}: {m}")
        assert len(got["norms"]) == len(ref["norms"])
        if mode != "step":
            assert not any(got["grads_after_backward"]), (
                f"rank {rank}: p.grad kept after backward: {got['grads_after_backward']}")


@needs_triton
@pytest.mark.parametrize("mode", list(W.MODES))
def test_triton_mean_of_squares_on_local_shards_equals_the_torch_path(ranks, mode):
    world_size, results = ranks
    for rank, result in enumerate(results):
        want = ok(result[("torch-fp32", "adamw-mean_of_squares", mode)],
                  f"rank {rank}: torch path mean_of_squares {mode}")
        got = ok(result[("triton-fp32", "adamw-mean_of_squares", mode)],
                 f"rank {rank}: Triton mean_of_squares {mode}")
        assert_ran_triton(got, f"rank {rank}: mean_of_squares {mode}")
        assert_windows_close(got["params"], want["params"],
                             f"rank {rank}: Triton vs torch mean_of_squares {mode}",
                             FP32_RTOL, FP32_ATOL)


# ----- scenario 5: tied weights, nested wrapping, mixed precision --------------------------

@pytest.mark.parametrize("no_sync", list(REFERENCES), ids=list(REFERENCES.values()))
@pytest.mark.parametrize("mode", list(W.MODES))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", list(W.TIED_MP_OPTS))
def test_tied_weights_under_a_mixed_precision_policy_equal_torch_optim(ranks, name, backend,
                                                                       mode, no_sync):
    world_size, results = ranks
    for rank, result in enumerate(results):
        ref = ok(result[("torch-tied-mp", name, no_sync)], f"rank {rank}: tied-mp reference")
        got = ok(result[("tied-mp", name, backend, mode)],
                 f"rank {rank}: tied-mp {name} on {backend} in {mode} mode")
        assert len(got["params"][0]) == 3, "the tied weight must be one parameter"
        if backend == "triton":
            assert_ran_triton(got, f"rank {rank}: tied-mp {name} {mode}")
        if mode != "step":
            assert not any(got["grads_after_backward"]), got["grads_after_backward"]
        assert_windows_close(got["params"], ref["params"],
                             f"rank {rank}: tied-mp {name} {backend} {mode}",
                             FP32_RTOL, FP32_ATOL)


def test_tied_mp_references_agree_and_move(ranks):
    """Both ways of running the reference agree, and the parameters move (the test can fail)."""
    world_size, results = ranks
    for rank, result in enumerate(results):
        for name in W.TIED_MP_OPTS:
            every = ok(result[("torch-tied-mp", name, False)], f"rank {rank}: (a)")
            no_sync = ok(result[("torch-tied-mp", name, True)], f"rank {rank}: (b)")
            assert_windows_close(every["params"], no_sync["params"],
                                 f"rank {rank}: {name} (a) vs (b)", FP32_RTOL, FP32_ATOL)
            moved = max((a - b).abs().max().item()
                        for a, b in zip(every["params"][0], every["params"][1]))
            assert moved > 1e-4, f"{name}: the parameters barely moved ({moved})"


# ----- scenario 6: torch.distributed.checkpoint resumes exactly ----------------------------

@pytest.mark.parametrize("point", list(W.SAVE_POINTS))
@pytest.mark.parametrize("name", list(W.DCP_OPTS))
def test_dcp_standard_recipe_resumes_exactly(ranks, name, point):
    world_size, results = ranks
    for rank, result in enumerate(results):
        got = ok(result[("dcp", name, point)], f"rank {rank}: DCP {name} saved {point}")
        problems = []
        for check in (
                lambda: assert_params_close(got["loaded_params"], got["saved_params"],
                                            "model parameters after the load"),
                lambda: assert_params_close(got["resumed_final"], got["final"],
                                            "resumed run vs uninterrupted run"),
        ):
            try:
                check()
            except AssertionError as err:
                problems.append(str(err))
        if got["loaded_position"] != got["saved_position"]:
            problems.append(f"(micro_step, num_updates) after the load {got['loaded_position']}"
                            f", saved {got['saved_position']}")
        assert not problems, f"rank {rank}: " + "\n".join(problems)


# ----- scenario 7: a 2-rank boundary checkpoint loads on 3 ranks -------------------------------

def reshard_pair(run2, run3, name):
    saved = ok(run2[1][0][("dcp", name, W.RESHARD_POINT)], f"2-rank DCP {name} run")
    return saved, [ok(r[("reshard", name)], f"3-rank rank {rank}: loading the 2-rank {name} "
                      "checkpoint") for rank, r in enumerate(run3[1])]


@pytest.mark.parametrize("name", list(W.DCP_OPTS))
def test_reshard_2_to_3_loads_the_saved_state(run2, run3, name):
    saved, loaded = reshard_pair(run2, run3, name)
    torch_entries = {key: value for key, value in saved["saved_state"].items()
                     if key[1] in W.TORCH_STATE_KEYS}
    assert torch_entries, f"saved state has none of torch's keys: {sorted(saved['saved_state'])}"
    for rank, got in enumerate(loaded):
        assert got["loaded_position"] == saved["saved_position"], (
            f"rank {rank}: (micro_step, num_updates) {got['loaded_position']} after the load, "
            f"saved {saved['saved_position']}")
        assert_params_close(got["loaded_params"], saved["saved_params"],
                            f"rank {rank}: parameters after the load")
        for key, (value, kind) in torch_entries.items():
            assert key in got["loaded_state"], f"rank {rank}: {key} missing after the load"
            new, new_kind = got["loaded_state"][key]
            if torch.is_tensor(value) and value.dim() > 0:
                assert new_kind == "DTensor", f"rank {rank}: {key} loaded as {new_kind}"
            torch.testing.assert_close(torch.as_tensor(new), torch.as_tensor(value),
                                       rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}: {key}: {m}")


@pytest.mark.parametrize("name", list(W.DCP_OPTS))
def test_reshard_2_to_3_continues_as_the_2_rank_run(run2, run3, name):
    saved, loaded = reshard_pair(run2, run3, name)
    first = W.SAVE_POINTS[W.RESHARD_POINT] // W.K
    for rank, got in enumerate(loaded):
        assert sorted(got["resumed_windows"]) == list(range(first, W.DCP_WINDOWS))
        for w, params in got["resumed_windows"].items():
            assert_params_close(params, saved["windows"][w],
                                f"rank {rank}: 3-rank resumed vs 2-rank uninterrupted, window {w}")
