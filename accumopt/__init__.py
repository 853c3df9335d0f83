"""accumopt: gradient accumulation inside the optimizer.

Call ``step()`` once per micro-batch; each micro-batch gradient is folded straight into the
optimizer's moments and the parameters move once every ``accum_steps`` micro-batches.
"""
from .adam import AccumAdam, AccumAdamW
from .lion import AccumLion
from .muon import AccumMuon
from .schedulers import per_update
from .sgdm import AccumSGDM
from .tiger import AccumTiger, tiger_param_groups
from .window import AccumOptimizer

__version__ = "0.1.0"
__all__ = ["AccumSGDM", "AccumAdam", "AccumAdamW", "AccumTiger", "AccumLion", "AccumMuon",
           "AccumOptimizer", "tiger_param_groups", "per_update", "__version__"]
