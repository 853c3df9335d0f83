import importlib.util
import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton tests run the kernels in Triton's interpreter on CPU tensors; it must
# be switched on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` from the repository root puts the root on sys.path, where the kernels/ source
# folder would import as a top-level `kernels` (it installs as accumopt.kernels only). That name
# belongs to a PyPI package that transformers probes for: keep it unimportable, as it is for an
# installed accumopt.
_REPO_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "kernels")
try:
    _spec = importlib.util.find_spec("kernels")
except (ImportError, ValueError):
    _spec = None
if _spec is not None and _spec.origin is not None and \
        os.path.dirname(os.path.abspath(_spec.origin)) == _REPO_KERNELS:
    sys.modules["kernels"] = None

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
