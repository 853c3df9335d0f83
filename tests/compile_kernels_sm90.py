"""Compile every micro-step kernel variant ahead of time for an H100 (sm_90) with Triton's own
compiler and ptxas — no GPU needed — with the launch shape and register cap the launcher uses,
and print, per variant and dtype, the global loads and stores in the PTX and (where Triton ships
cuobjdump) the registers and stack bytes per thread of the cubin, as JSON. Run by
test_kernel_compile.py in a process without TRITON_INTERPRET."""
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
import triton.language as tl

API_MISMATCH = 3  # exit status: this triton has no such ahead-of-time API (not a kernel error)
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(API_MISMATCH)

from accumopt.kernels.micro_step import HOOK_ARGS, micro_step_kernel
import torch

from accumopt.kernels.tables import LAUNCH_SHAPES, MAX_REGISTERS
from accumopt.kernels.window import window_kernel

SIGNATURE = {
    "work_ptr": "*i32", **{name: "i64" if name.startswith("hook_grad") else "i32"
                           for name in HOOK_ARGS},
    "n_work": "i32", "numel_ptr": "*i64",
    "table_ptr": "*i64", "n_tensors": "i32", "folds_ptr": "*i32", "updates_ptr": "*fp32",
    "window_ptr": "*i32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
    "accum_steps": "i32", "lr": "fp32",
    "beta1": "fp32", "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32",
    "weight_decay": "fp32", "momentum": "fp32", "dampening": "fp32"}


def compile_for_sm90(fn, signature, constexprs, num_warps=4):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:  # older triton: constants= instead of constexprs=
        sys.exit(API_MISMATCH)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "maxnreg": MAX_REGISTERS})


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def resource_usage(cubin):
    """(registers, stack bytes) per thread from cuobjdump, or None without it."""
    if not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    registers, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(registers.group(1)), int(stack.group(1)) if stack else 0) if registers else None


def main():
    report = {}
    dtypes = (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16))
    shapes = {tl.float32: LAUNCH_SHAPES[torch.float32], tl.bfloat16: LAUNCH_SHAPES[torch.bfloat16],
              tl.float16: LAUNCH_SHAPES[torch.float16]}
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
                              BLOCK=shapes[dtype][0])
            compiled = compile_for_sm90(micro_step_kernel, SIGNATURE, constexprs,
                                        num_warps=shapes[dtype][1])
            entry = dict(Counter(re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"])))
            usage = resource_usage(compiled.asm["cubin"])
            if usage is not None:
                entry["registers"], entry["stack_bytes"] = usage
            report[f"{variant}-{name}"] = entry
    compile_for_sm90(window_kernel, {
        "table_ptr": "*i64", "n_tensors": "i32", "folds_ptr": "*i32", "updates_ptr": "*fp32",
        "window_ptr": "*i32", "found_inf_ptr": "*fp32", "accum_steps": "i32"},
        dict(HAS_FOUND_INF=True, BLOCK=256))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
