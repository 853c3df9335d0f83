"""Where the Triton tests run: CUDA when there is a GPU, else the interpreter on the CPU."""
import importlib.util
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")
