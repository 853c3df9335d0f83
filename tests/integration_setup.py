"""What the three framework integration tests share: the run's shape (7 micro-batches of batch
size 1 per epoch with k=3: windows of 3, 3 and a short 1), the optimizer pairs compared, and the
parameter comparison."""
import torch

from accumopt import AccumAdamW, AccumSGDM

K = 3
N = 7           # micro-batches per epoch: windows 3, 3, 1
EPOCHS = 2
WINDOWS = EPOCHS * 3
LR = 0.05
RTOL64 = dict(rtol=1e-9, atol=1e-12)

# (accumopt class, its kwargs, torch.optim class, its kwargs); both get the same lr.
VARIANTS = {
    "SGDM": (AccumSGDM, dict(momentum=0.9, weight_decay=0.01),
             torch.optim.SGD, dict(momentum=0.9, weight_decay=0.01)),
    "AdamW": (AccumAdamW, dict(second_moment="square_of_mean", betas=(0.9, 0.99),
                               weight_decay=0.1),
              torch.optim.AdamW, dict(betas=(0.9, 0.99), weight_decay=0.1)),
}
# Window clipping needs the window gradient: the exact variants that hold it.
CLIP_VARIANTS = {
    "SGDM-nesterov": (AccumSGDM, dict(momentum=0.9, nesterov=True),
                      torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    "AdamW": VARIANTS["AdamW"],
}


def assert_params_close(framework, got, want, what, tol=RTOL64):
    """Named parameters ``got`` (accumopt's run) against ``want`` (torch.optim's)."""
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: (
            f"{framework}, {what}, parameter {name!r}: {m}"))
