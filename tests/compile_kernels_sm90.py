"""Compile every micro-step kernel variant ahead of time for an H100 (sm_90) with Triton's own
compiler and ptxas — no GPU needed — and print, per variant and dtype, the global loads and
stores in the PTX as JSON. Run by test_kernel_compile.py in a process without TRITON_INTERPRET."""
import json
import re
import sys
from collections import Counter

import triton
import triton.language as tl

API_MISMATCH = 3  # exit status: this triton has no such ahead-of-time API (not a kernel error)
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(API_MISMATCH)

from accumopt.kernels.micro_step import micro_step_kernel
from accumopt.kernels.tables import BLOCK
from accumopt.kernels.window import window_kernel

SIGNATURE = {
    "work_ptr": "*i32", "n_work": "i32", "numel_ptr": "*i64", "table_ptr": "*i64",
    "n_tensors": "i32", "folds_ptr": "*i32", "updates_ptr": "*fp32", "window_ptr": "*i32",
    "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "hook_grad_addr": "i64",
    "accum_steps": "i32", "lr": "fp32",
    "beta1": "fp32", "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32",
    "weight_decay": "fp32", "momentum": "fp32", "dampening": "fp32"}


def compile_for_sm90(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:  # older triton: constants= instead of constexprs=
        sys.exit(API_MISMATCH)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def main():
    report = {}
    dtypes = (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16))
    for variant in range(4):
        # Step mode in every dtype, and the fold_in_backward launches (HOOK, a flush, an
        # export's fold-only flush) in fp32.
        for name, dtype, hook, flush, fold_only in [(n, d, False, False, False)
                                                    for n, d in dtypes] + [
                ("fp32-hook", tl.float32, True, False, False),
                ("fp32-flush", tl.float32, False, True, False),
                ("fp32-fold-only", tl.float32, False, True, True)]:
            constexprs = dict(VARIANT=variant, DTYPE=dtype, MAXIMIZE=True, MEAN=True,
                              DECOUPLED=variant % 2 == 0, AMSGRAD=True, NESTEROV=True,
                              MOMENTUM_BUFFER=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                              HOOK=hook, MOVE_UNFOLDED=not flush, FOLD_ONLY=fold_only,
                              BLOCK=BLOCK)
            ptx = compile_for_sm90(micro_step_kernel, SIGNATURE, constexprs).asm["ptx"]
            report[f"{variant}-{name}"] = Counter(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))
    compile_for_sm90(window_kernel, {
        "table_ptr": "*i64", "n_tensors": "i32", "folds_ptr": "*i32", "updates_ptr": "*fp32",
        "window_ptr": "*i32", "found_inf_ptr": "*fp32", "accum_steps": "i32"},
        dict(HAS_FOUND_INF=True, BLOCK=256))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
