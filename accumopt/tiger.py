"""AccumTiger: Tiger (Su Jianlin, github.com/bojone/tiger), gradient accumulation inside the
optimizer with no buffer at all."""
from torch import nn

from .family import Variant, kernel
from .functional.tiger import LR_SCALES, tiger_micro_step
from .validation import as_float, check_beta, check_choice
from .window import AccumOptimizer


class AccumTiger(AccumOptimizer):
    r"""Tiger whose ``step()`` is called once per micro-batch and moves the parameters once every
    ``accum_steps`` calls. Tiger is Lion with β1 = β2 = β: its update reads only the momentum,
    so the momentum is the accumulator (Su's χ-indicator rule) and no gradient buffer is held.
    Per window, with Ḡ the window gradient and θ, m before the update:

        m ← β·m + (1-β)·Ḡ          folded: m ← β·m + (1-β)·w·g_1, then m ← m + (1-β)·w·g_t
        θ ← θ - η·(sign(m) + λ·θ)  η = lr·s

    and s per param group's ``lr_scale``: ``"rms"`` the RMS of θ over the tensor (matrices),
    ``"row_rms"`` per row, over the last dimension (embeddings), ``"half"`` 0.5 with λ = 0
    (biases and norm gains), None 1. :func:`tiger_param_groups` makes the three groups of a
    model, as bojone/tiger chooses by variable name. After each window θ and ``exp_avg`` equal
    the rule applied once to Ḡ. sign(0) = 0.

    With fold_in_backward Tiger holds θ and m only: 8 bytes per fp32 parameter, the least of any
    accumulating optimizer. ``max_grad_norm`` is refused (Ḡ never exists). bojone's NaN guard is
    not carried over: it needs a second read of every gradient; drop a micro-batch with inf/NaN
    gradients as a whole instead (GradScaler's found_inf, in step mode). On the Triton path the
    kernels fold; the window's last micro-step (sign and RMS) runs in torch.
    """

    def __init__(self, params, lr=1e-3, beta=0.965, weight_decay=0.01, *, lr_scale="rms",
                 maximize=False, foreach=None, fused=None, capturable=False,
                 differentiable=False, accum_steps=1, accum_reduction="mean",
                 fold_in_backward=False, step_per_window=False, max_grad_norm=None,
                 process_group=None, backend="auto"):
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, lr_scale=lr_scale,
                        maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                        differentiable=differentiable, accum_steps=accum_steps,
                        accum_reduction=accum_reduction, fold_in_backward=fold_in_backward,
                        step_per_window=step_per_window, max_grad_norm=max_grad_norm,
                        backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group):
        check_beta("beta", group["beta"])
        check_choice("lr_scale", group["lr_scale"], LR_SCALES)
        if group["max_grad_norm"] is not None:
            raise ValueError("Invalid max_grad_norm: window clipping needs the window gradient, "
                             "which AccumTiger never holds (its momentum is the accumulator). "
                             "Use AccumLion (it keeps Ḡ), or max_grad_norm=None")

    def _variant(self, group):
        return TIGER

    def _hyper(self, group):
        return dict(lr=as_float(group["lr"]), beta=group["beta"],
                    weight_decay=group["weight_decay"], lr_scale=group["lr_scale"],
                    maximize=group["maximize"])


TIGER = Variant("tiger", ("exp_avg",), tiger_micro_step, kernel("tiger_micro_step"),
                averaged=("exp_avg",), move_in_torch=True)


def tiger_param_groups(model, **group_options):
    """A model's parameters as AccumTiger's param groups, each with its ``lr_scale``: the
    weights of nn.Embedding modules ``"row_rms"``, other parameters of at most one dimension
    (biases, norm gains) ``"half"``, the rest ``"rms"``; ``group_options`` go into every group.
    A parameter shared by several modules (a tied embedding) is listed once. Empty groups are
    left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"rms": [], "row_rms": [], "half": []}
    for param in model.parameters():
        scale = "row_rms" if id(param) in embeddings else "half" if param.ndim <= 1 else "rms"
        groups[scale].append(param)
    return [{"params": params, **group_options, "lr_scale": scale}
            for scale, params in groups.items() if params]
