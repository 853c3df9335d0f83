"""A micro-step is two kernel launches per bucket (one param group's tensors of one device and
dtype), whatever the number of tensors."""
import pytest
import torch

import accumopt.kernels.tables as tables
from accumopt import AccumAdamW, AccumSGDM
from triton_device import DEVICE, needs_triton

pytestmark = needs_triton
N_TENSORS = 150  # GPT-2 small has 148


class CountingKernel:
    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)
        return counted


def params_of(dtypes):
    return [torch.nn.Parameter(torch.randn(3 + i % 5, device=DEVICE, dtype=dtypes[i % len(dtypes)]))
            for i in range(N_TENSORS)]


@pytest.mark.parametrize("cls,kwargs", [(AccumAdamW, {}), (AccumSGDM, dict(nesterov=True))])
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float32, torch.bfloat16]],
                         ids=["one-dtype", "two-dtypes"])
def test_launches_per_micro_step(monkeypatch, cls, kwargs, dtypes):
    counts = {}
    monkeypatch.setattr(tables, "micro_step_kernel",
                        CountingKernel(tables.micro_step_kernel, counts, "micro_step"))
    monkeypatch.setattr(tables, "window_kernel",
                        CountingKernel(tables.window_kernel, counts, "window"))
    params = params_of(dtypes)
    opt = cls(params, lr=1e-2, accum_steps=2, backend="triton", **kwargs)
    for step in range(4):
        for i, p in enumerate(params):
            p.grad = None if (i + step) % 7 == 0 else torch.randn_like(p)
        counts.clear()
        opt.step()
        assert counts == {"micro_step": len(dtypes), "window": len(dtypes)}, (step, counts)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.profiler counts CUDA kernels")
def test_cuda_kernels_per_micro_step_in_the_profiler():
    from torch.profiler import ProfilerActivity, profile
    params = params_of([torch.float32])
    opt = AccumAdamW(params, accum_steps=2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the tables and compiles
    torch.cuda.synchronize()
    for _ in range(2):  # one fold-only micro-step, one update micro-step
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert len(kernels) == 2, [e.name for e in kernels]
