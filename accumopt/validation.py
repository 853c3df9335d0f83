"""Argument checks shared by the accumopt optimizers. Each raises before anything changes and
names the argument it rejects."""
import numbers

import torch

from .functional.micro_batch import ACCUM_REDUCTIONS

SECOND_MOMENTS = ("mean_of_squares", "square_of_mean")


def _is_real(value):
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name, value):
    if not _is_real(value) or not value >= 0:  # `not >=` also catches NaN
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number >= 0)")


def check_beta(name, value):
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


def check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_beta("beta1 (betas[0])", betas[0])
    check_beta("beta2 (betas[1])", betas[1])


def check_accum_steps(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid accum_steps: {value!r} (must be a positive int)")


def check_choice(name, value, choices):
    if value not in choices:
        allowed = ", ".join(map(repr, choices))
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {allowed})")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def check_window_args(group):
    """The arguments every accumopt optimizer takes, checked on a filled-in param group."""
    check_nonnegative("lr", group["lr"])
    check_nonnegative("weight_decay", group["weight_decay"])
    check_accum_steps(group["accum_steps"])
    check_choice("accum_reduction", group["accum_reduction"], ACCUM_REDUCTIONS)
    check_bool("maximize", group["maximize"])
    check_bool("fold_in_backward", group["fold_in_backward"])
