"""AccumMuon: torch.optim.Muon, gradient accumulation inside the optimizer."""
import torch

from .family import Variant, kernel
from .functional.muon import muon_momentum_micro_step, muon_nesterov_micro_step
from .validation import as_float, check_bool, check_nonnegative, check_nonnegative_int
from .window import AccumOptimizer

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class AccumMuon(AccumOptimizer):
    r"""torch.optim.Muon whose ``step()`` is called once per micro-batch and moves the
    parameters once every ``accum_steps`` calls: after each window θ and ``momentum_buffer``
    equal torch.optim.Muon stepped once with the window gradient Ḡ, for every option,
    Newton–Schulz included (torch's own, in bf16):

        B ← μ·B + (1-μ)·Ḡ
        U = (1-μ)·Ḡ + μ·B if nesterov else B
        θ ← θ·(1 - lr·λ);  θ ← θ - adjust_lr(lr, shape)·NS(U)

    nesterov=False is bufferless (B is the accumulator: B ← μ·B + (1-μ)·w·g_1, then
    B ← B + (1-μ)·w·g_t); nesterov=True holds one accumulator of Ḡ (state ``grad_accum``), since
    U needs Ḡ beside B, and allows ``max_grad_norm``. Newton–Schulz runs once per window per
    matrix, on the update step (torch matmuls: ns_steps · 3 matmuls of the matrix). 2-D
    parameters only, as torch.optim.Muon (ValueError otherwise): pair it with AccumAdamW for the
    rest, both stepped in one loop. On the Triton path the kernels fold; the window's last
    micro-step runs in torch.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, *, accum_steps=1, accum_reduction="mean",
                 fold_in_backward=False, step_per_window=False, max_grad_norm=None,
                 process_group=None, backend="auto"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, accum_steps=accum_steps,
                        accum_reduction=accum_reduction, fold_in_backward=fold_in_backward,
                        step_per_window=step_per_window, max_grad_norm=max_grad_norm,
                        backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_params(self, params):
        for p in params:
            if isinstance(p, torch.Tensor) and p.ndim != 2:
                raise ValueError(f"Invalid params: Muon only supports 2D parameters whereas we "
                                 f"found a parameter with size: {p.size()}")
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise ValueError("Invalid params: Muon does not support complex parameters")

    def _check_group(self, group):
        check_nonnegative("momentum", group["momentum"])
        check_bool("nesterov", group["nesterov"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative_int("ns_steps", group["ns_steps"])
        if group["ns_steps"] >= 100:
            raise ValueError(f"Invalid ns_steps: {group['ns_steps']!r} (must be less than 100, "
                             f"as torch.optim.Muon)")
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r} (must be a tuple of "
                             f"exactly 3 values)")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {group['adjust_lr_fn']} is not "
                             f"supported (Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}; must "
                             f"be one of {', '.join(map(repr, ADJUST_LR_FNS))})")
        if group["max_grad_norm"] is not None and not group["nesterov"]:
            raise ValueError("Invalid max_grad_norm: window clipping needs the window gradient, "
                             "which AccumMuon with nesterov=False never holds (its momentum "
                             "buffer is the accumulator). Use nesterov=True (it keeps Ḡ), or "
                             "max_grad_norm=None")

    def _variant(self, group):
        return MUON_NESTEROV if group["nesterov"] else MUON

    def _hyper(self, group):
        return dict(lr=as_float(group["lr"]), weight_decay=group["weight_decay"],
                    momentum=group["momentum"], nesterov=group["nesterov"],
                    ns_coefficients=tuple(group["ns_coefficients"]), eps=group["eps"],
                    ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"],
                    maximize=False)


MUON = Variant("muon", ("momentum_buffer",), muon_momentum_micro_step, kernel("muon_micro_step"),
               averaged=("momentum_buffer",), move_in_torch=True, foreach=False)
MUON_NESTEROV = Variant("muon nesterov", ("grad_accum", "momentum_buffer"),
                        muon_nesterov_micro_step, kernel("muon_micro_step"),
                        averaged=("grad_accum",), move_in_torch=True, foreach=False)
