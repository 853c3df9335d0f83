"""Which implementation runs a param group's micro-step: "torch" (accumopt.functional) or
"triton" (accumopt.kernels); "auto" picks Triton for CUDA tensors when it imports."""
import functools
import importlib.util
import os

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_importable():
    return importlib.util.find_spec("triton") is not None


def triton_interpreted():
    """Triton's interpreter runs kernels on CPU tensors; it must be on before triton imports."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_can_run(params):
    if not triton_importable():
        return False
    return triton_interpreted() or all(p.is_cuda for p in params)


def check_backend(backend, params):
    """Raise ValueError naming ``backend`` for an unknown name or a Triton that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (must be one of "
                         f"{', '.join(map(repr, BACKENDS))})")
    if backend == "triton" and not triton_can_run(params):
        why = ("triton is not installed" if not triton_importable() else
               "the parameters are not all CUDA tensors and TRITON_INTERPRET=1 is not set")
        raise ValueError(f"Invalid backend: 'triton' cannot run here: {why}. "
                         f"Use backend='auto' or 'torch'.")
