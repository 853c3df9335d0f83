"""The single-tensor and foreach forms of every variant's math give the same bits on the CPU,
over mixed dtypes, first/later folds, update-only steps and fresh momentum buffers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accumopt import functional as F

case = st.fixed_dictionaries({
    "seed": st.integers(0, 2 ** 31 - 1),
    "n": st.integers(1, 6),
    "accum_steps": st.integers(1, 5),
    "reduction": st.sampled_from(["mean", "sum"]),
    "maximize": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "grad_scale": st.sampled_from([None, 1024.0]),
})


def make_lists(seed, n):
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64]
    params, grads, first, update, fresh = [], [], [], [], []
    for i in range(n):
        dtype = dtypes[int(torch.randint(2, (), generator=gen))]
        shape = (int(torch.randint(1, 5, (), generator=gen)),)
        params.append(torch.randn(shape, generator=gen).to(dtype))
        is_first = bool(torch.rand((), generator=gen) < 0.5)
        is_update = bool(torch.rand((), generator=gen) < 0.5)
        has_grad = is_first or not is_update or bool(torch.rand((), generator=gen) < 0.7)
        grads.append(torch.randn(shape, generator=gen).to(dtype) if has_grad else None)
        first.append(is_first)
        update.append(is_update)
        fresh.append(bool(torch.rand((), generator=gen) < 0.3))
    return params, grads, first, update, fresh


def like(tensors, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in tensors]
    return [t.abs() for t in out] if positive else out


def run_both(fn, tensor_lists, *args, **kwargs):
    results = []
    for foreach in (False, True):
        lists = [[None if t is None else t.clone() for t in lst] for lst in tensor_lists]
        fn(*lists, *args, foreach=foreach, **kwargs)
        results.append(lists)
    return results


def assert_same_bits(results, what):
    single, multi = results
    for li, (a_list, b_list) in enumerate(zip(single, multi)):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            if a is None:
                continue
            assert torch.equal(a, b), f"{what}: list {li}, tensor {i}: {a} vs {b}"


@given(c=case, momentum=st.sampled_from([0.5, 0.9]), dampening=st.sampled_from([0.0, 0.3]))
def test_sgdm_forms_agree(c, momentum, dampening):
    params, grads, first, update, fresh = make_lists(c["seed"], c["n"])
    bufs = like(params, c["seed"] + 1)
    results = run_both(F.sgdm_micro_step, [params, grads, bufs], fresh, first, update, lr=0.1,
                       momentum=momentum, dampening=dampening, weight_decay=c["weight_decay"],
                       maximize=c["maximize"], accum_steps=c["accum_steps"],
                       accum_reduction=c["reduction"], grad_scale=c["grad_scale"])
    assert_same_bits(results, "sgdm")


@given(c=case, momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans())
def test_sgd_exact_forms_agree(c, momentum, nesterov):
    params, grads, first, update, fresh = make_lists(c["seed"], c["n"])
    # An update-only step or a later fold needs an accumulator; a first fold overwrites it.
    accums = like(params, c["seed"] + 2)
    bufs = like(params, c["seed"] + 3) if momentum else [None] * len(params)
    results = run_both(F.sgd_exact_micro_step, [params, grads, accums, bufs], fresh, first,
                       update, lr=0.1, momentum=momentum, dampening=0.0,
                       weight_decay=c["weight_decay"], nesterov=nesterov and momentum > 0,
                       maximize=c["maximize"], accum_steps=c["accum_steps"],
                       accum_reduction=c["reduction"], grad_scale=c["grad_scale"])
    assert_same_bits(results, "sgd exact")


@pytest.mark.parametrize("second_moment", ["mean_of_squares", "square_of_mean"])
@given(c=case, amsgrad=st.booleans(), decoupled=st.booleans())
def test_adam_forms_agree(second_moment, c, amsgrad, decoupled):
    params, grads, first, update, _ = make_lists(c["seed"], c["n"])
    m = like(params, c["seed"] + 4)
    v = like(params, c["seed"] + 5, positive=True)
    vmax = [t * 1.5 for t in v]
    steps = [torch.tensor(float(i % 3)) for i in range(len(params))]
    lists = [params, grads, m, v, vmax, steps]
    fn = F.adam_mean_of_squares_micro_step
    if second_moment == "square_of_mean":
        lists.insert(2, like(params, c["seed"] + 6))
        fn = F.adam_square_of_mean_micro_step
    results = run_both(fn, lists, first, update, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=c["weight_decay"], decoupled_weight_decay=decoupled,
                       amsgrad=amsgrad, maximize=c["maximize"], accum_steps=c["accum_steps"],
                       accum_reduction=c["reduction"], grad_scale=c["grad_scale"])
    assert_same_bits(results, f"adam {second_moment}")
