"""accumopt's Triton kernels, installed as ``accumopt.kernels`` (setup.py's package_dir).

Each micro-step of a bucket (one param group's tensors of one device and dtype) is two launches
whatever the number of tensors: the fused micro-step kernel (accumopt.kernels.micro_step) and the
window-bookkeeping kernel (accumopt.kernels.window). The launchers sit beside the PyTorch math
they mirror: accumopt.kernels.sgd, .adam, and the fold-only launchers of the families whose move
stays in torch (.tiger, .lion, .muon), which reuse the fused kernel's two folds.
"""
from .adam import (MEAN_OF_SQUARES_SLOTS, SQUARE_OF_MEAN_SLOTS, adam_mean_of_squares_micro_step,
                   adam_square_of_mean_micro_step)
from .lion import LION_SLOTS, lion_micro_step
from .muon import MUON_NESTEROV_SLOTS, MUON_SLOTS, muon_micro_step
from .sgd import SGD_EXACT_SLOTS, SGDM_SLOTS, sgd_exact_micro_step, sgdm_micro_step
from .tables import DeviceWindow, kernel_can_take
from .tiger import TIGER_SLOTS, tiger_micro_step

__all__ = ["DeviceWindow", "kernel_can_take", "sgdm_micro_step", "sgd_exact_micro_step",
           "adam_mean_of_squares_micro_step", "adam_square_of_mean_micro_step", "SGDM_SLOTS",
           "SGD_EXACT_SLOTS", "MEAN_OF_SQUARES_SLOTS", "SQUARE_OF_MEAN_SLOTS", "tiger_micro_step",
           "lion_micro_step", "muon_micro_step", "TIGER_SLOTS", "LION_SLOTS", "MUON_SLOTS",
           "MUON_NESTEROV_SLOTS"]
