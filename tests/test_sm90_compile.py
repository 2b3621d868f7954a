"""The decoding step's Triton kernels compiled ahead of time for the H200 (sm_90) on a machine
without a GPU: what the interpreter cannot show — that each compiles for Hopper, keeps its loads
pipelined (cp.async), uses the tensor-core instructions its tiles are sized for (wgmma from 64
rows), fits the 227 KiB of shared memory a block may have, and that the split-K fixup orders its
partials before its counter (bar.sync, then one acquire-release atomic). Integer arguments are
declared 16-divisible as Triton's launcher specialises the ones that are. Skipped where Triton
has no CUDA backend."""
import json
import os
import subprocess
import sys

import pytest

SMEM_MAX = 232448            # bytes of shared memory a block may use on sm_90
# The tests' process runs the kernels through the interpreter (conftest sets TRITON_INTERPRET):
# the compiler runs in a child process without it.
_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
a = json.load(sys.stdin)
mod, name = a["kernel"].rsplit(".", 1)
fn = getattr(importlib.import_module(mod), name)
sig = {n: ("constexpr" if n in a["const"] else a["types"].get(n, "i32")) for n in fn.arg_names}
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in a["div16"]}
k = triton.compile(ASTSource(fn, sig, a["const"], attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": a["warps"], "num_stages": a["stages"]})
json.dump({"shared": k.metadata.shared, "ptx": k.asm["ptx"]}, sys.stdout)
"""


def _compile(kernel: str, types: dict, const: dict, div16: list, warps: int, stages: int):
    """kernel "module.name" compiled for sm_90 -> (shared memory bytes, PTX)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(dict(kernel=kernel, types=types, const=const,
                       div16=div16, warps=warps, stages=stages)), capture_output=True, text=True, env=env, timeout=300)
    if p.returncode:
        if "ImportError" in p.stderr or "ptxas" in p.stderr.lower() and "not found" in p.stderr.lower():
            pytest.skip("this Triton cannot compile for sm_90 here: " + p.stderr.strip().splitlines()[-1])
        raise AssertionError(p.stderr[-3000:])
    r = json.loads(p.stdout)
    return r["shared"], r["ptx"]


@pytest.mark.parametrize("split,block_m,has_add,even", [(1, 64, False, True), (8, 64, True, True), (4, 128, True, False),
                                                        (1, 16, False, True)])
def test_skinny_gemm_compiles_for_sm90(split, block_m, has_add, even):
    types = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", add_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
    const = dict(HAS_ADD=has_add, SPLIT_K=split, EVEN_K=even, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, IEEE=False, UPCAST=False)
    div16 = list(types) + ["N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_ym", "stride_am"]
    shared, ptx = _compile("iicl_fast.kernels.skinny_gemm._skinny_kernel", types, const, div16, 4, 4)
    assert "cp.async" in ptx                                   # the K loop pipelined
    assert ("wgmma" in ptx) == (block_m >= 64) and ("mma.sync" in ptx) == (block_m < 64)
    assert shared <= SMEM_MAX
    if split > 1:
        fix = ptx[ptx.index("atom.global.gpu.acq_rel.add"):]
        assert "bar.sync" in ptx[:ptx.index("atom.global.gpu.acq_rel.add")].rsplit("st.global", 1)[1]
        assert "ld.global.cg" in fix or "ld.cg" in fix or ".cg." in fix   # partials past the L1
        assert "atom.global.gpu.acq_rel.exch" in fix                       # the counter reset
    else:
        assert "atom." not in ptx


@pytest.mark.parametrize("pipe", [False, True])
def test_suffix_merge_compiles_for_sm90(pipe):
    """MERGE_PIPE's loop over the prefix partials is pipelined: more cp.async than the loops'."""
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", lo_ptr="*i32", cur_ptr="*i32", op_ptr="*fp32",
                 lp_ptr="*fp32", out_ptr="*bf16", scale="fp32")
    const = dict(G=4, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, IEEE=False, UPCAST=False, UNROLL_SP=0, BLOCK_SP=8,
                 PIPE=pipe, PIPE_STAGES=3)
    div16 = [n for n in types if n.endswith("_ptr")] + ["D", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kn",
                                                        "stride_oph", "stride_ops", "stride_opm", "stride_lph", "stride_lps",
                                                        "stride_outb"]
    shared, ptx = _compile("iicl_fast.kernels.prefix_attention._suffix_merge_kernel", types, const, div16, 4, 2)
    assert shared <= SMEM_MAX
    n = ptx.count("cp.async.cg")
    if pipe:
        _, loops = _compile("iicl_fast.kernels.prefix_attention._suffix_merge_kernel", types, {**const, "PIPE": False},
                            div16, 4, 2)
        assert n > loops.count("cp.async.cg") > 0
    else:
        assert n > 0                                         # the suffix part's K/V loop


def test_prefix_tiles_compile_for_sm90():
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*fp32", lse_ptr="*fp32", scale="fp32")
    const = dict(G=4, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, IEEE=False, UPCAST=False)
    div16 = [n for n in types if n.endswith("_ptr")] + ["D", "M", "K", "GN", "stride_qb", "stride_qh", "stride_kh",
                                                        "stride_kn", "stride_oh", "stride_os", "stride_om", "stride_lh",
                                                        "stride_ls"]
    shared, ptx = _compile("iicl_fast.kernels.prefix_attention._prefix_kernel", types, const, div16, 4, 3)
    assert "wgmma" in ptx and "cp.async" in ptx and shared <= SMEM_MAX


@pytest.mark.parametrize("last", [False, True])
def test_l2_prefetch_compiles_for_sm90(last):
    """The prefetch kernel's inline PTX assembles for sm_90 (ptxas runs in triton.compile): one
    predicated bulk L2 prefetch a lane, kept though its dummy result is unused, evict-last
    lines under a cache policy where asked; no shared memory, no loads into the SM."""
    types = dict(ptr="*u8", nbytes="i64", spans_ptr="*i64")
    const = dict(SUB=4096, BLOCK=128, LAST=last, RECORD=False)
    shared, ptx = _compile("iicl_fast.kernels.l2_prefetch._prefetch_kernel", types, const, ["ptr"], 4, 1)
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == 1 and "@p cp.async.bulk" in ptx
    assert ("createpolicy.fractional.L2::evict_last" in ptx) == last and ("L2::cache_hint" in ptx) == last
    assert shared == 0 and "ld.global" not in ptx
