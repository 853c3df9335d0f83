"""kernels: each variant's fold micro-step and update micro-step, in GB/s and as a fraction of a
device-to-device copy measured in the same run, against torch.optim doing the same work with
standard accumulation and torch-optimi's optimizer accumulation.

Bytes per element are those the operation must move at the least, 4 per fp32 value read or
written: accumopt AdamW fold 5 (read g, m, v; write m, v), update 7 (also read and write θ);
SGDM fold 3, update 5; Tiger fold 3 (g, m; write m), update 5; Lion fold 3 (g, acc; write acc),
update 6 (g, acc, m, θ; write m, θ); Muon fold 3, update 5 plus Newton–Schulz's matmuls (its
update is not a bandwidth figure). Tiger, Lion and Muon fold with the kernels and run the
window's last micro-step (sign, RMS, Newton–Schulz) in torch. Standard accumulation's
micro-step is autograd's ``.grad += g`` (3); its update micro-step adds the optimizer step
(AdamW 7, SGD-momentum 5) to that. optimi counts as accumopt AdamW.
"""
import torch

from accumopt import AccumAdamW, AccumLion, AccumMuon, AccumSGDM, AccumTiger
from benchmarks import peers
from benchmarks.shapes import gpt2_shapes, llama_shapes
from benchmarks.timing import median_ms

SUITE = "kernels"
FOLD_FOREVER = 2 ** 30  # accum_steps that never ends a window: every step is a fold
BYTES = {  # (fold, update) values moved per element
    "adamw": {"accumopt": (5, 7), "standard": (3, 10), "optimi": (5, 7)},
    "sgdm": {"accumopt": (3, 5), "standard": (3, 8)},
    "tiger": {"accumopt": (3, 5)},
    "lion": {"accumopt": (3, 6)},
    "muon": {"accumopt": (3, 5)},
}
MATRICES_ONLY = {"muon"}


def cases(device, quick):
    if device == "cuda" and not quick:
        sizes = [2 ** p for p in (20, 22, 24, 26, 28)]
        lists = [("gpt2-124M", gpt2_shapes()), ("llama-1B", llama_shapes())]
    else:
        sizes = [2 ** 16, 2 ** 18]
        lists = [("gpt2-tiny", gpt2_shapes(n_layer=2, d_model=64, vocab=1024, n_ctx=64))]
    # The power-of-two sizes as 1024-wide matrices (Muon takes matrices only; the rest are
    # elementwise and see no difference).
    return [(f"2^{n.bit_length() - 1}", [(n // 1024, 1024)]) for n in sizes] + lists


def impls(device):
    """(name, variant, family, make(params) -> (fold, update) callables) per implementation."""
    found = []
    backends = (["triton"] if device == "cuda" else []) + ["torch"]
    for backend in backends:
        for variant, cls, kw in (("adamw", AccumAdamW, {}), ("sgdm", AccumSGDM, {"lr": 1e-3}),
                                 ("tiger", AccumTiger, {}), ("lion", AccumLion, {}),
                                 ("muon", AccumMuon, {})):
            found.append((f"accumopt {backend}", variant, "accumopt",
                          _accumopt(cls, dict(kw, backend=backend))))
    flavours = ["foreach"] + (["fused"] if device == "cuda" else [])
    for flavour in flavours:
        found.append((f"torch AdamW {flavour}", "adamw", "standard",
                      _standard(torch.optim.AdamW, {flavour: True})))
        found.append((f"torch SGD {flavour}", "sgdm", "standard",
                      _standard(torch.optim.SGD, {flavour: True, "lr": 1e-3, "momentum": 0.9})))
    if peers.optimi() is not None:
        found.append(("torch-optimi", "adamw", "optimi", _optimi(device)))
    return found


def _accumopt(cls, kwargs):
    def make(params):
        fold_opt = cls(params, accum_steps=FOLD_FOREVER, **kwargs)
        update_opt = cls(params, accum_steps=1, **kwargs)
        fold_opt.step()  # builds tables, compiles
        update_opt.step()
        return fold_opt.step, update_opt.step
    return make


def _standard(cls, kwargs):
    def make(params):
        accum = [torch.zeros_like(p) for p in params]
        grads = [p.grad for p in params]
        opt = cls(params, **kwargs)
        opt.step()

        def fold():
            torch._foreach_add_(accum, grads)

        def update():
            torch._foreach_add_(accum, grads)
            opt.step()
        return fold, update
    return make


def _optimi(device):
    def make(params):
        fold_opt = peers.OptimiAccumulation(params, FOLD_FOREVER, lr=1e-3,
                                            triton=device == "cuda")
        update_opt = peers.OptimiAccumulation(params, 1, lr=1e-3, triton=device == "cuda")
        return fold_opt.step_without_backward, update_opt.step_without_backward
    return make


def _warm(fold_update):
    fold_update[0]()
    return fold_update


def run(device, quick, results, progress):
    if peers.optimi() is None:
        results.note(SUITE, peers.MISSING)
    if device != "cuda":
        results.note(SUITE, "no GPU: the Triton and fused rows need CUDA and are skipped; "
                            "CPU numbers say nothing about GPU bandwidth")
    copy = results.env["copy_GBps"]
    for case, shapes in cases(device, quick):
        numel = sum(torch.Size(s).numel() for s in shapes)
        for name, variant, family, make in impls(device):
            if variant in MATRICES_ONLY and any(len(s) != 2 for s in shapes):
                progress.advance(f"{SUITE}: {case} {name} {variant} (not matrices: skipped)")
                continue
            params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            made = peers.guarded(family == "optimi", results, SUITE, progress,
                                 f"{case} {name} {variant}", lambda: _warm(make(params)))
            if made is None:
                continue
            fold, update = made
            fold_bytes, update_bytes = BYTES[variant][family]
            for what, fn, nbytes in (("fold", fold, fold_bytes), ("update", update, update_bytes)):
                ms = median_ms(fn, device)
                gbps = nbytes * 4 * numel / ms / 1e6
                impl = f"{name} ({variant})"
                results.add(SUITE, case, impl, f"{what}_ms", ms, "ms")
                results.add(SUITE, case, impl, f"{what}_GBps", gbps, "GB/s")
                results.add(SUITE, case, impl, f"{what}_of_copy", gbps / copy, "fraction")
            del params, fold, update
            progress.advance(f"{SUITE}: {case} {name} {variant}")


def work(device, quick):
    return len(cases(device, quick)) * len(impls(device))


SWEEP_BLOCKS = (512, 1024, 2048, 4096)
SWEEP_WARPS = (2, 4, 8)
SWEEP_DTYPES = (torch.float32, torch.bfloat16)


def sweep_work(device):
    return len(SWEEP_DTYPES) * len(SWEEP_BLOCKS) * len(SWEEP_WARPS) if device == "cuda" else 1


def sweep(device, results, progress):
    """``--sweep``: the AccumAdamW fold and update micro-steps on 2^26 elements for every block
    size x warps per dtype (accumopt.kernels.tables.LAUNCH_SHAPES, restored after), to set
    the defaults from measurements. CUDA only."""
    if device != "cuda":
        results.note(SUITE, "--sweep needs a GPU: not run")
        progress.advance(f"{SUITE}: sweep skipped")
        return
    from accumopt.kernels import tables
    saved = dict(tables.LAUNCH_SHAPES)
    numel, copy = 2 ** 26, results.env["copy_GBps"]
    try:
        for dtype in SWEEP_DTYPES:
            size = torch.finfo(dtype).bits // 8
            for block in SWEEP_BLOCKS:
                for warps in SWEEP_WARPS:
                    tables.LAUNCH_SHAPES[dtype] = (block, warps)
                    params = [torch.nn.Parameter(torch.randn(numel, device=device, dtype=dtype))]
                    params[0].grad = torch.randn_like(params[0])
                    fold, update = _accumopt(AccumAdamW, dict(backend="triton"))(params)
                    case = f"sweep {str(dtype).split('.')[-1]} block={block} warps={warps}"
                    for what, fn, values in (("fold", fold, 5), ("update", update, 7)):
                        ms = median_ms(fn, device)
                        gbps = values * size * numel / ms / 1e6
                        results.add(SUITE, case, "accumopt triton (adamw)", f"{what}_GBps",
                                    gbps, "GB/s")
                        results.add(SUITE, case, "accumopt triton (adamw)", f"{what}_of_copy",
                                    gbps / copy, "fraction")
                    del params, fold, update
                    progress.advance(f"{SUITE}: {case}")
    finally:
        tables.LAUNCH_SHAPES.clear()
        tables.LAUNCH_SHAPES.update(saved)
