"""AccumLion: Lion (Chen et al. 2023; lucidrains/lion-pytorch), gradient accumulation inside
the optimizer."""
from .family import Variant, kernel
from .functional.lion import lion_micro_step
from .validation import as_float, check_betas
from .window import AccumOptimizer


class AccumLion(AccumOptimizer):
    r"""Lion whose ``step()`` is called once per micro-batch and moves the parameters once every
    ``accum_steps`` calls. Per window, with Ḡ the window gradient and θ, m before the update
    (lion-pytorch's update, op for op):

        θ ← θ·(1 - lr·λ)
        θ ← θ - lr·sign(β1·m + (1-β1)·Ḡ)
        m ← β2·m + (1-β2)·Ḡ

    The direction and the momentum weigh Ḡ differently, so one accumulator of Ḡ (state
    ``grad_accum``) is held beside ``exp_avg``; after each window θ and ``exp_avg`` equal Lion
    stepped once with Ḡ. sign(0) = 0. ``max_grad_norm`` clips Ḡ. On the Triton path the kernels
    fold; the window's last micro-step (the sign) runs in torch.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 foreach=None, fused=None, capturable=False, differentiable=False,
                 accum_steps=1, accum_reduction="mean", fold_in_backward=False,
                 step_per_window=False, max_grad_norm=None, process_group=None,
                 backend="auto"):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, capturable=capturable,
                        differentiable=differentiable, accum_steps=accum_steps,
                        accum_reduction=accum_reduction, fold_in_backward=fold_in_backward,
                        step_per_window=step_per_window, max_grad_norm=max_grad_norm,
                        backend=backend)
        super().__init__(params, defaults, process_group=process_group)

    def _check_group(self, group):
        check_betas(group["betas"])

    def _variant(self, group):
        return LION

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=as_float(group["lr"]), beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], maximize=group["maximize"])


LION = Variant("lion", ("grad_accum", "exp_avg"), lion_micro_step, kernel("lion_micro_step"),
               averaged=("grad_accum",), move_in_torch=True)
