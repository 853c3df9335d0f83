"""The math of every accumopt variant in plain PyTorch, one micro-step per call.

This is the CPU path, what ``backend="torch"`` runs, and the reference the Triton kernels in
:mod:`accumopt.kernels` are tested against. Each function takes lists of tensors and per-tensor
``first`` / ``update`` flags worked out by the optimizer's window bookkeeping, and has a
single-tensor form (the readable one) and a ``foreach=True`` multi-tensor form grouped by device
and dtype; on the CPU both give the same bits in float32 and float64 (in bf16/fp16 torch._foreach_*
rounds a Python scalar to the tensor dtype first, so the two forms may differ in the last bit).
"""
from .adam import adam_mean_of_squares_micro_step, adam_square_of_mean_micro_step
from .micro_batch import ACCUM_REDUCTIONS, micro_batch_weights
from .sgd import sgd_exact_micro_step, sgdm_micro_step

__all__ = ["adam_mean_of_squares_micro_step", "adam_square_of_mean_micro_step",
           "sgd_exact_micro_step", "sgdm_micro_step", "micro_batch_weights", "ACCUM_REDUCTIONS"]
