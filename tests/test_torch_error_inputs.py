"""PyTorch's own optimizer error inputs (torch.testing._internal.common_optimizers, the ones
pytorch's test_optim.py runs on torch.optim.Adam, AdamW, SGD and Muon), run on the accumopt
optimizer that stands in for each, the way torch's test_errors runs them: the same error type
and torch's own message pattern. Skipped where this torch's test helpers cannot be imported.

Left out, because the contract differs from torch on purpose (README, "torch.optim
compatibility"): a Tensor lr or Tensor betas with foreach=True (accepted: the math takes their
values), and Muon's complex parameters (refused when the optimizer is built, not at step())."""
import warnings

import pytest
import torch

from accumopt import AccumAdam, AccumAdamW, AccumMuon, AccumSGDM

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test helpers need expecttest")

STAND_INS = {torch.optim.Adam: AccumAdam, torch.optim.AdamW: AccumAdamW,
             torch.optim.SGD: AccumSGDM}
if hasattr(torch.optim, "Muon"):      # (torch >= 2.9)
    STAND_INS[torch.optim.Muon] = AccumMuon
ACCEPTED_ON_PURPOSE = ("lr as a Tensor is not supported for capturable=False and foreach=True",
                       r"betas\[0\] as a Tensor is not supported for capturable=False and "
                       r"foreach=True",
                       "Muon does not support complex parameters")


def error_cases():
    for info in common_optimizers.optim_db:
        if info.optim_cls not in STAND_INS:
            continue
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            if error.error_regex in ACCEPTED_ON_PURPOSE:
                continue
            yield pytest.param(STAND_INS[info.optim_cls], error,
                               id=f"{info.optim_cls.__name__}-{error.optimizer_error_input.desc}")


@pytest.mark.parametrize("cls,error", list(error_cases()))
def test_torchs_error_inputs_raise_torchs_errors(cls, error):
    given = error.optimizer_error_input
    # (params may be None, as in torch's inputs: the hyperparameters are checked first.)
    kwargs = dict(given.kwargs, backend="torch")
    if error.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                cls(given.params, **kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                cls(given.params, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(given.params, **kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            opt.step()


def test_every_stand_in_has_error_inputs_run():
    """The list above is not empty by accident (torch renaming its helpers would skip all)."""
    ran = {cls for cls, error in (p.values for p in error_cases())}
    assert ran == set(STAND_INS.values()), ran
