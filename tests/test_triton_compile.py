"""The Triton kernels compile for a real GPU (sm_90 cubin) even on a machine without one.

The interpreter tests (test_triton.py) check numerics but never run Triton's compiler; this catches code the
interpreter accepts and the compiler rejects, before a GPU session is spent on it. Runs in a subprocess
because tests/conftest.py switches the kernels to the interpreter in this process. The GPU image has another
triton (3.6) than this machine (3.9): to check it too, install it aside (``pip install --no-deps --target DIR
triton==3.6.0``) and run this file with ``PYTHONPATH=DIR``."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from manu_fast.kernels.act_stats import _act_stats_kernel
from manu_fast.kernels.common import merge_kernel
from manu_fast.kernels.gated_gemm import _gated_gemm_act_stats_kernel

def compile_kernel(fn, ptrs, consts, opts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "tau" else "i32") for n in fn.arg_names}
    return len(triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts).asm["cubin"])

flags = ("HAS_UP", "HAS_KEEP", "HAS_GID", "WRITE_OUT", "STATS_H", "STATS_PRE", "STATS_UP")
for dt, act, on in (("bf16", 0, True), ("fp16", 2, True), ("fp32", 1, False)):
    ptrs = dict(pre_ptr=f"*{dt}", up_ptr=f"*{dt}", out_ptr=f"*{dt}", keep_ptr="*i1", gid_ptr="*i32", scratch_ptr="*fp32",
                touched_ptr="*i64")
    for acc_rows in (1, 32):
        consts = dict(ACT=act, RTNE_BF16=False, BLOCK_T=32, BLOCK_N=64, ACC_ROWS=acc_rows, **{f: on for f in flags})
        assert compile_kernel(_act_stats_kernel, ptrs, consts, dict(num_warps=4)) > 0
for dt, on in (("bf16", True), ("fp32", False)):
    ptrs = {n: f"*{dt}" for n in ("x_ptr", "wg_ptr", "bg_ptr", "wu_ptr", "bu_ptr", "out_ptr")}
    ptrs.update(keep_ptr="*i1", gid_ptr="*i32", scratch_ptr="*fp32", touched_ptr="*i64")
    consts = dict(ACT=0, HAS_BIAS_G=on, HAS_BIAS_U=on, HAS_KEEP=on, HAS_GID=on, STATS_H=True, STATS_PRE=on,
                  STATS_UP=on, DOT_FP32=dt == "fp32", RTNE_BF16=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
    assert compile_kernel(_gated_gemm_act_stats_kernel, ptrs, consts, dict(num_warps=8, num_stages=3)) > 0
ptrs = dict(scratch_ptr="*fp32", touched_ptr="*i64", acc_h_ptr="*fp64", acc_pre_ptr="*fp64", acc_up_ptr="*fp64")
assert compile_kernel(merge_kernel, ptrs, dict(BLOCK_N=64), dict(num_warps=4)) > 0
print("compiled with triton", triton.__version__)
'''


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled with triton" in run.stdout
