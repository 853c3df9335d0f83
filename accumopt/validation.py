"""Argument checks shared by the accumopt optimizers. Each raises before anything changes and
names the argument it rejects."""
import math
import numbers

import torch

from .functional.micro_batch import ACCUM_REDUCTIONS

SECOND_MOMENTS = ("mean_of_squares", "square_of_mean")


def _is_real(value):
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# torch.optim's own words for a bad value, where it has them (so that a message matches what
# torch users and torch's optimizer tests look for); accumopt's names the argument after them.
_TORCH_WORDS = {"lr": "Invalid learning rate", "weight_decay": "Invalid weight_decay value",
                "eps": "Invalid epsilon value", "momentum": "Invalid momentum value",
                "dampening": "Invalid dampening value"}


def _check_one_element(name, value):
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element (Invalid {name}: a Tensor of shape "
                         f"{tuple(value.shape)})")


def check_nonnegative(name, value):
    _check_one_element(name, value)
    if not _is_real(value) or not value >= 0:  # `not >=` also catches NaN
        words = _TORCH_WORDS.get(name, f"Invalid {name}")
        raise ValueError(f"{words}: {value} ({name} must be a real number >= 0)")


def check_beta(name, value, words=None):
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{words or f'Invalid {name}'}: {value} ({name} must be in [0, 1))")


def check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        _check_one_element(f"betas[{i}]", beta)
        check_beta(f"beta{i + 1} (betas[{i}])", beta, f"Invalid beta parameter at index {i}")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors (Invalid betas: "
                         f"{betas!r})")


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
    check_bool("maximize", group.get("maximize", False))
    check_bool("fold_in_backward", group["fold_in_backward"])
    check_bool("step_per_window", group["step_per_window"])
    if group["step_per_window"] and not group["fold_in_backward"]:
        raise ValueError("Invalid step_per_window: True needs fold_in_backward=True (the hooks "
                         "count and fold each backward pass); without hooks the framework's own "
                         ".grad accumulation already is torch.optim's, so use torch.optim there "
                         "or accumopt with step_per_window=False")
    check_max_grad_norm(group["max_grad_norm"])
    check_torch_flags(group)


def check_max_grad_norm(value):
    if value is None:
        return
    if not _is_real(value) or isinstance(value, torch.Tensor) or not math.isfinite(value) or \
            not value > 0:
        raise ValueError(f"Invalid max_grad_norm: {value!r} (must be None, which turns window "
                         f"clipping off, or a finite number > 0)")


# Options whose value is a choice of how this process runs, not part of the training state: a
# checkpoint never overrides them (a Triton checkpoint must load on a CPU machine, a step-mode
# one must not turn fold_in_backward's memory saving off).
RUNTIME_OPTIONS = ("backend", "fold_in_backward", "step_per_window", "foreach", "fused",
                   "capturable", "differentiable")


def check_optional_bool(name, value):
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be None, True or False)")


def check_torch_flags(group):
    """torch.optim's own flags, with torch's meaning where one applies: ``foreach`` picks the
    torch path's multi-tensor form, ``fused=True`` the Triton kernels; ``capturable`` and
    ``differentiable`` are accepted as False."""
    check_optional_bool("foreach", group.get("foreach"))
    check_optional_bool("fused", group.get("fused"))
    check_bool("capturable", group.get("capturable", False))
    check_bool("differentiable", group.get("differentiable", False))
    if group.get("fused") and group.get("foreach"):
        # torch.optim's error (a RuntimeError there too): two implementations asked for at once.
        raise RuntimeError("`fused` and `foreach` cannot be `True` together (fused=True runs the "
                           "Triton kernels, foreach=True the torch path's multi-tensor form)")
    if group.get("fused") and group["backend"] == "torch":
        raise ValueError("Invalid fused: True asks for the Triton kernels, but backend='torch' "
                         "never runs them (use backend='auto' or 'triton', or fused=None)")
    if group.get("capturable"):
        raise ValueError("Invalid capturable: True is not supported (a step() is not CUDA-graph "
                         "capturable: it copies gradient addresses from the host). The Triton "
                         "path already keeps its window counters and Adam's step on the device; "
                         "use capturable=False")
    if group.get("differentiable"):
        raise ValueError("Invalid differentiable: True is not supported (accumopt's step folds "
                         "gradients in place under no_grad); use differentiable=False")


def check_nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 0)")


def as_float(value):
    """A hyperparameter as a Python float (a one-element Tensor lr included)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
