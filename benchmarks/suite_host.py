"""host: the host (Python) time of accumopt's Triton path per micro-step on GPT-2-124M's 148
tensors, beside torch.optim.AdamW(foreach=True)'s own step on the same tensors in the same run,
and the time to build the device tables of a LLaMA-7B-sized bucket. On a GPU the tensors are
GPT-2's, on CUDA, and the host time is the time until the call returns (no sync, the kernels
launch for real). Without one the measurement runs in a child process (TRITON_INTERPRET=1) with
Triton's launches made no-ops, on CPU tensors of GPT-2's layout at width 256 (the same 148
tensors, the same 50 at or above fold_in_backward's hook-launch size and 98 below it, 9.8M
parameters), and the 7B tables on the meta device (shape work only). AdamW's own Python is its
step with torch's foreach ops made no-ops; its `step_us` on the CPU is real CPU arithmetic, no
host figure.

- `fold_us`, `update_us`: AccumAdamW step mode, a fold micro-step and an update micro-step.
- `hooks_and_step_us`: fold_in_backward, one micro-step: every parameter's hook (the function
  registered on it, called as autograd calls it once the gradient is final) and the step()
  after them, less `autograd_us`, the same loop setting each .grad (from None, as the hooks
  leave it) without the hooks (autograd's own work, in C++ in a real backward and in step mode
  alike).
- `step_us` (torch.optim.AdamW foreach): its whole step, once per window; `python_us`: the same
  step with torch's foreach ops made no-ops, i.e. its own Python.
- `bare_hook_us`: per parameter, a hook of the same shape (a functools.partial through a weak
  reference to a method) that only frees `.grad`: the floor under any per-parameter hook.
- `zero_grad_us`: the loop's zero_grad() after each step(): in step mode it frees the
  gradients (the hooks have freed them in fold_in_backward mode).
- `of_adamw_python`: accumopt's time per micro-step as a fraction of AdamW's own Python per
  step (goal: at most 25% in step mode); `of_step_mode`: fold_in_backward's hooks and step() as
  a multiple of step mode's micro-step (goal: at most 2); `loop_of_step_mode`: the same with
  each mode's zero_grad() added (the whole per-micro-step cost of the training loop, where
  fold_in_backward's hooks do the freeing zero_grad does in step mode; no goal).
- `first_hook_us`, `large_hook_us`, `small_hook_us`, `hook_step_us`: where that time goes, each
  hook timed alone: the first hook of a micro-step (it checks the bucket; its launch arguments
  are an earlier micro-step's), a later large tensor's (held for a launch of up to 8: the median
  is a hook that only holds), a small tensor's (held for step()), and the step() after the
  hooks; `large_tensors` / `small_tensors` count them.
- `tables_ms`: building one bucket's DeviceWindow for a 7B-parameter model (goal: 50 ms)."""
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import weakref

import torch

from benchmarks.shapes import gpt2_shapes, llama_shapes

SUITE = "host"
REPS = 200
TABLE_REPS = 5


def llama7b_shapes():
    return llama_shapes(n_layer=32, d_model=4096, d_ff=11008, vocab=32000)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _silence_kernels():
    from accumopt.kernels import tables
    tables.micro_step_kernel = _NoLaunch()
    tables.window_kernel = _NoLaunch()


class _foreach_ops_as_no_ops:
    """torch._foreach_* return their first argument without running: what is left of
    torch.optim.AdamW(foreach=True)'s step is its own Python."""

    def __enter__(self):
        self.saved = {name: getattr(torch, name) for name in dir(torch)
                      if name.startswith("_foreach_")}
        for name in self.saved:
            setattr(torch, name, lambda *args, **kwargs: args[0])

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch, name, fn)


def _median_us(fn, reps=REPS, sync=None):
    return _side_by_side([(fn, contextlib.nullcontext)], reps, sync)[0]


def _side_by_side(calls, reps=REPS, sync=None):
    """Median µs of each ``(fn, context)`` with the calls interleaved one by one (each inside a
    fresh ``context()``, entered outside the timed span), so that a change in the machine's speed
    during the run reaches all of them alike; the order turns each round, so that each follows
    each of the others equally often (what ran before decides what is still in the caches)."""
    for fn, context in calls:
        with context():
            for _ in range(5):
                fn()
    if sync is not None:
        sync()
    times = [[] for _ in calls]
    for rep in range(reps):
        for j in range(len(calls)):
            i = (rep + j) % len(calls)
            fn, context = calls[i]
            with context():
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
            if sync is not None:
                sync()     # outside the timed span: the next call starts on an idle queue
    return [statistics.median(spans) * 1e6 for spans in times]


def _params(device, shapes):
    return [torch.nn.Parameter(torch.empty(s, device=device)) for s in shapes]


def measure(device):
    """{metric: value} for this process's device ("cuda", or "cpu" with no-op launches)."""
    from accumopt import AccumAdamW
    sync = torch.cuda.synchronize if device == "cuda" else None
    # On the CPU GPT-2's layout at width 256: the same tensors and the same split into large
    # (own hook launch) and small (held for step()) ones, a twelfth of the memory.
    shapes = gpt2_shapes() if device == "cuda" else gpt2_shapes(d_model=256, vocab=1024,
                                                                n_ctx=256)
    out = {}

    params = _params(device, shapes)
    grads = [torch.empty_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    out["adamw_step_us"] = _median_us(adamw.step, reps=REPS if device == "cuda" else 20,
                                      sync=sync)
    fold = AccumAdamW(params, lr=1e-4, accum_steps=2 ** 30, backend="triton")
    update = AccumAdamW(params, lr=1e-4, accum_steps=1, backend="triton")
    for p in params:
        p.grad = None
    hooked = AccumAdamW(params, lr=1e-4, accum_steps=2 ** 30, backend="triton",
                        fold_in_backward=True)
    # The hooks as autograd calls them once a gradient is final: the functions registered on
    # each parameter, after .grad is set (in backward that is autograd's C++, the same in step
    # mode, so the loop's own time without the hooks is taken off).
    hooks = [list(p._post_accumulate_grad_hooks.values()) for p in params]
    assert all(len(h) == 1 for h in hooks), "one fold_in_backward hook per parameter"

    def hooks_and_step():
        with torch.no_grad():               # autograd runs the hooks with grad mode off
            for p, g, (hook,) in zip(params, grads, hooks):
                p.grad = g
                hook(p)
        hooked.step()

    def loop_alone():
        with torch.no_grad():
            for p, g, (hook,) in zip(params, grads, hooks):
                p.grad = g

    @contextlib.contextmanager
    def grads_set():
        for p, g in zip(params, grads):
            p.grad = g
        yield

    @contextlib.contextmanager
    def grads_freed():
        # As the hooks leave them (and as autograd finds them): setting a .grad that is None
        # costs more than setting the same tensor again.
        for p in params:
            p.grad = None
        yield

    @contextlib.contextmanager
    def adamw_python():
        with grads_set(), _foreach_ops_as_no_ops():
            yield
    # Side by side, interleaved: AdamW's own Python, step mode's two kinds of micro-step,
    # fold_in_backward's hooks and step(), and the same loop without the hooks (each ratio the
    # suite reports is between calls of this one run).
    (out["adamw_python_us"], out["fold_us"], out["update_us"], total,
     out["autograd_us"]) = _side_by_side(
        [(adamw.step, adamw_python), (fold.step, grads_set), (update.step, grads_set),
         (hooks_and_step, grads_freed), (loop_alone, grads_freed)], sync=sync)
    # The loop's zero_grad() after step(): in step mode it frees the micro-batch's gradients.
    out["zero_grad_us"] = _side_by_side([(fold.zero_grad, grads_set)], reps=REPS // 4)[0]
    del adamw, fold, update
    for p in params:
        p.grad = None
    out.update(_hooks_apart(hooked, params, grads, hooks, sync))
    # The loop's zero_grad() in fold_in_backward mode: the hooks have freed every gradient.
    out["hook_zero_grad_us"] = _median_us(hooked.zero_grad, reps=REPS // 4)
    hooked.remove_hooks()
    owner = _Freeing()     # (kept alive: the hook holds it weakly, as fold_in_backward's do)
    bare = functools.partial(_bare_hook, weakref.ref(owner))

    def bare_hooks():         # (the same loop as loop_alone's, with the bare hook called)
        with torch.no_grad():
            for p, g, (hook,) in zip(params, grads, hooks):
                p.grad = g
                bare(p)
    autograd_us, bare_us = _side_by_side([(loop_alone, grads_freed),
                                          (bare_hooks, grads_freed)], reps=REPS // 4)
    out["bare_hook_us"] = (bare_us - autograd_us) / len(params)
    out["hooks_and_step_us"] = total - out["autograd_us"]
    hooked = params = grads = None   # free them before the 7B tables

    from accumopt.kernels import DeviceWindow
    big = _params(device if device == "cuda" else "meta", llama7b_shapes())
    slots = [tuple(torch.empty_like(p) for p in big) for _ in range(3)]
    build = lambda: DeviceWindow(big, slots, [0] * len(big), [0.0] * len(big), (0, 0, 0, 0))
    out["tables_ms"] = _median_us(build, reps=TABLE_REPS, sync=sync) / 1e3
    out["tables_params"] = float(sum(p.numel() for p in big))
    return out


class _Freeing:
    def free(self, param):
        param.grad = None


def _bare_hook(owner_ref, param):
    """A hook of fold_in_backward's shape that does nothing but free the gradient: a
    functools.partial, a weak reference to its owner, a method call."""
    owner = owner_ref()
    if owner is not None:
        owner.free(param)


def _hooks_apart(optimizer, params, grads, hooks, sync):
    """Where fold_in_backward's time goes: each hook timed alone (less the timer's own span),
    the first of a micro-step apart from the rest (it checks the bucket), the others by kind (a
    large tensor's, held for a shared launch, a small one's stash), and the step() after them."""
    from accumopt.kernels import tables
    clock = time.perf_counter_ns
    timer = statistics.median(-clock() + clock() for _ in range(1000))
    large = [p.numel() >= tables.HOOK_LAUNCH_MIN_NUMEL for p in params]
    spans = [[] for _ in params]
    steps = []
    for _ in range(REPS // 4):
        with torch.no_grad():
            for span, p, g, (hook,) in zip(spans, params, grads, hooks):
                p.grad = g
                start = clock()
                hook(p)
                span.append(clock() - start)
        start = clock()
        optimizer.step()
        steps.append(clock() - start)
        if sync is not None:
            sync()

    def median_us(rows):
        return (statistics.median(x for row in rows for x in row) - timer) / 1e3
    return {"first_hook_us": median_us(spans[:1]),
            "large_hook_us": median_us([s for s, big in zip(spans[1:], large[1:]) if big]),
            "small_hook_us": median_us([s for s, big in zip(spans[1:], large[1:]) if not big]),
            "hook_step_us": statistics.median(steps) / 1e3,
            "large_tensors": sum(large), "small_tensors": len(large) - sum(large)}


def _child():
    _silence_kernels()
    json.dump(measure("cpu"), sys.stdout)


def run(device, quick, results, progress):
    if device == "cuda":
        row = measure("cuda")
        where = "CUDA tensors, real launches"
    else:
        env = dict(os.environ, TRITON_INTERPRET="1")
        child = subprocess.run([sys.executable, "-m", "benchmarks.suite_host"], env=env,
                               capture_output=True, text=True, timeout=600)
        if child.returncode != 0:
            results.note(SUITE, f"the measurement failed: {child.stderr.strip()[-500:]}")
            progress.advance(f"{SUITE}: failed")
            return
        row = json.loads(child.stdout.strip().splitlines()[-1])
        where = ("GPT-2's 148 tensors at width 256 on the CPU, Triton's launches no-ops: host "
                 "work only (AdamW's step_us is CPU arithmetic); the 7B tables on the meta "
                 "device")
    results.note(SUITE, f"{where}; median of {REPS} calls")
    case = "gpt2-124M, 148 tensors" if device == "cuda" else "gpt2 layout (width 256), 148 tensors"
    python = row["adamw_python_us"]
    results.add(SUITE, case, "torch.optim.AdamW foreach", "step_us", row["adamw_step_us"], "us")
    results.add(SUITE, case, "torch.optim.AdamW foreach", "python_us", python, "us")
    step_mode = max(row["fold_us"], row["update_us"])
    for metric in ("fold_us", "update_us", "zero_grad_us"):
        results.add(SUITE, case, "AccumAdamW triton step mode", metric, row[metric], "us")
    for metric in ("hooks_and_step_us", "first_hook_us", "large_hook_us", "small_hook_us",
                   "bare_hook_us", "hook_step_us", "autograd_us"):
        results.add(SUITE, case, "AccumAdamW triton fold_in_backward", metric, row[metric],
                    "us")
    for metric in ("large_tensors", "small_tensors"):
        results.add(SUITE, case, "AccumAdamW triton fold_in_backward", metric, row[metric],
                    "count")
    results.add(SUITE, case, "AccumAdamW triton step mode", "of_adamw_python",
                step_mode / python, "fraction")
    results.add(SUITE, case, "AccumAdamW triton fold_in_backward", "of_adamw_python",
                row["hooks_and_step_us"] / python, "fraction")
    results.add(SUITE, case, "AccumAdamW triton fold_in_backward", "of_step_mode",
                row["hooks_and_step_us"] / step_mode, "x")
    results.add(SUITE, case, "AccumAdamW triton fold_in_backward", "zero_grad_us",
                row["hook_zero_grad_us"], "us")
    results.add(SUITE, case, "AccumAdamW triton fold_in_backward", "loop_of_step_mode",
                (row["hooks_and_step_us"] + row["hook_zero_grad_us"])
                / (step_mode + row["zero_grad_us"]), "x")
    results.add(SUITE, f"llama-7B bucket, {row['tables_params'] / 1e9:.1f}B parameters",
                "DeviceWindow", "tables_ms", row["tables_ms"], "ms")
    progress.advance(f"{SUITE}: measured")


def work(device, quick):
    return 1


if __name__ == "__main__":
    _child()
