"""Compiles the Triton kernels of dfs_kernels for NVIDIA GPUs on a machine without one.

Triton lowers a kernel to PTX and assembles it with the ptxas its wheel bundles, with no driver
involved, so a CPU-only CI can check that every kernel still compiles for sm_80 / sm_90 with its
GPU autotuning configurations, dtypes and constexpr variants (the interpreter, which runs the
numerical tests on CPU, never compiles anything). Unit strides are passed as the constants Triton's
launcher specializes them to, as for NCHW / NHWC tensors at run time.

    python tests/triton_compile_check.py                # one configuration per kernel variant (CI)
    python tests/triton_compile_check.py --all          # every autotuning configuration
    python tests/triton_compile_check.py --pipelining   # every configuration of the GEMM kernels:
                                                        # no register spills, loads software-pipelined

``--pipelining`` compiles each default configuration of the forward (plain and with the fused exit
pooling, whose K loop holds a branch), input-gradient (convolution and linear) and weight-gradient
kernels (bfloat16 channels-last, as in training; the convolution's input gradient also in float32
NCHW on TF32) and checks what the compiler did: ptxas reports no spilled registers, the K loop's loads
became asynchronous copies into multi-buffered shared memory (Triton's software pipeliner), and, for
the kernels with a branch around or inside their K loop, the tiles in flight grow with
``num_stages`` (a loop the pipeliner skips keeps plain loads whatever ``num_stages`` says).
bfloat16 NCHW is left out: its loads gather 2-byte elements along pixels, too narrow for an
asynchronous copy, so no kernel pipelines there. So is IEEE float32,
whose dot runs on CUDA cores with both operand tiles in registers: the largest tiles spill a little
there, a price for the exact mode only.

Must run without TRITON_INTERPRET (the kernels are then JIT functions). Prints one line per
compile with its shared memory, and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _jobs(all_configs: bool, archs: list[int]):
    import torch

    from dfs_kernels.backends.triton import (
        conv_forward,
        conv_input_grad,
        conv_weight_grad,
        exit_pool,
        linear_input_grad,
        merge_channels,
    )

    def pick(configs):
        return configs if all_configs else configs[:1]

    precisions = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32")]
    if not all_configs:
        precisions = [("fp32", "ieee"), ("bf16", "tf32")]
    for arch in archs:
        for dtype, precision in precisions:
            for meta, warps, stages in pick(conv_forward._GPU_CONFIGS):
                for pool, unit in [  # NCHW tensors, then NHWC ones
                    (False, dict(sxw=1, syw=1, sww=1, X_PIXELS_CONTIGUOUS=True, Y_PIXELS_CONTIGUOUS=True,
                                 W_CHANNELS_CONTIGUOUS=False)),
                    (True, dict(sxc=1, syc=1, swc=1, X_PIXELS_CONTIGUOUS=False, Y_PIXELS_CONTIGUOUS=False,
                                W_CHANNELS_CONTIGUOUS=True)),
                ]:
                    yield (arch, "conv_forward", conv_forward._conv_forward_kernel,
                           dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, y_ptr=dtype, pool_ptr="fp32"),
                           dict(meta, KH=3, KW=3, HAS_BIAS=True, POOL=pool, DOT_PRECISION=precision, **unit),
                           (), warps, stages)
            for meta, warps, stages in pick(conv_input_grad.gpu_configs(getattr(torch, _TORCH_DTYPES[dtype]))):
                for fill, unit in [
                    (False, dict(sdyw=1, sdxw=1, sww=1, DY_PIXELS_CONTIGUOUS=True, DX_PIXELS_CONTIGUOUS=True)),
                    (True, dict(sdyc=1, sdxc=1, sgc=1, swc=1, DY_PIXELS_CONTIGUOUS=False, DX_PIXELS_CONTIGUOUS=False)),
                ]:
                    yield (arch, "conv_input_grad", conv_input_grad._conv_input_grad_kernel,
                           dict(dy_ptr=dtype, w_ptr=dtype, gp_ptr=dtype, dx_ptr=dtype),
                           dict(meta, KH=3, KW=3, FILL_POOLED=fill, DOT_PRECISION=precision, **unit),
                           ("inv_hw",), warps, stages)
            for meta, warps, stages in pick(linear_input_grad._GPU_CONFIGS):
                yield (arch, "linear_input_grad", linear_input_grad._linear_input_grad_kernel,
                       dict(dy_ptr=dtype, w_ptr=dtype, dx_ptr=dtype),
                       dict(meta, sdyk=1, swn=1, sdxn=1, DOT_PRECISION=precision), (), warps, stages)
            for meta, warps, stages in pick(conv_weight_grad._GPU_CONFIGS):
                for unit in [dict(sdyw=1, sxw=1, DY_CHANNELS_CONTIGUOUS=False, X_PIXELS_CONTIGUOUS=True),
                             dict(sdyc=1, sxc=1, DY_CHANNELS_CONTIGUOUS=True, X_PIXELS_CONTIGUOUS=False)]:
                    yield (arch, "conv_weight_grad", conv_weight_grad._conv_weight_grad_kernel,
                           dict(dy_ptr=dtype, x_ptr=dtype, dw_ptr="fp32", db_ptr="fp32"),
                           dict(meta, KH=3, KW=3, HAS_BIAS=True, DOT_PRECISION=precision, sdww=1, **unit),
                           (), warps, stages)
        for dtype in ("fp32", "bf16") if all_configs else ("bf16",):
            for meta, warps, stages in pick(exit_pool._POOL_CONFIGS):
                yield (arch, "exit_pool", exit_pool._exit_pool_kernel, dict(x_ptr=dtype, out_ptr=dtype),
                       dict(meta, sxw=1), ("inv_hw",), warps, stages)
            for meta, warps, stages in pick(exit_pool._BROADCAST_CONFIGS):
                yield (arch, "exit_pool_backward", exit_pool._exit_pool_backward_kernel,
                       dict(gp_ptr=dtype, dx_ptr=dtype), dict(meta, sdxc=1), ("inv_hw",), warps, stages)
            for meta, warps, stages in pick(merge_channels._CONFIGS):
                for head, tail in [(True, True), (False, True)]:
                    yield (arch, "merge_channels", merge_channels._merge_channels_kernel,
                           dict(head_ptr=dtype, tail_ptr=dtype, out_ptr=dtype),
                           dict(meta, HAS_HEAD=head, HAS_TAIL=tail, sow=1), (), warps, stages)


# Unit strides of the channels-last (NHWC) layout per kernel, and of NCHW.
_CHANNELS_LAST = {
    "conv_forward": dict(sxc=1, syc=1, swc=1, X_PIXELS_CONTIGUOUS=False, Y_PIXELS_CONTIGUOUS=False,
                         W_CHANNELS_CONTIGUOUS=True),
    "conv_input_grad": dict(sdyc=1, sdxc=1, sgc=1, swc=1, DY_PIXELS_CONTIGUOUS=False, DX_PIXELS_CONTIGUOUS=False),
    "conv_weight_grad": dict(sdyc=1, sxc=1, sdww=1, DY_CHANNELS_CONTIGUOUS=True, X_PIXELS_CONTIGUOUS=False),
    "linear_input_grad": dict(sdyk=1, swn=1, sdxn=1),  # row-major [rows, features] tensors
}
_NCHW = {"conv_input_grad": dict(sdyw=1, sdxw=1, sww=1, DY_PIXELS_CONTIGUOUS=True, DX_PIXELS_CONTIGUOUS=True)}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _pipelining_jobs(arch: int):
    """(name, kernel, pointers, constants, floats, warps, stages) of every default configuration of
    the GEMM kernels in the layouts whose loads can be pipelined."""
    import torch

    from dfs_kernels.backends.triton import conv_forward, conv_input_grad, conv_weight_grad, linear_input_grad

    # name: (kernel, pointers ("bf16": the operands' type), floats, the configurations for a dtype,
    #        [(operand dtype, constants)]); bfloat16 channels-last unless said otherwise.
    forward = dict(x_ptr="bf16", w_ptr="bf16", b_ptr="bf16", y_ptr="bf16", pool_ptr="fp32")
    conv = dict(KH=3, KW=3, DOT_PRECISION="tf32")
    kernels = {
        "conv_forward": (conv_forward._conv_forward_kernel, forward, (), lambda dtype: conv_forward._GPU_CONFIGS,
                         [("bf16", dict(conv, HAS_BIAS=True, POOL=False, **_CHANNELS_LAST["conv_forward"]))]),
        # The fused DFS stage's forward: the exit's sums are taken inside the K loop, under a branch.
        "conv_forward_pooled": (conv_forward._conv_forward_kernel, forward, (),
                                lambda dtype: conv_forward._GPU_CONFIGS,
                                [("bf16", dict(conv, HAS_BIAS=True, POOL=True, **_CHANNELS_LAST["conv_forward"]))]),
        # Plain, and with the exit's gradient as fill (the fused DFS stage), which adds to what is live;
        # float32 (TF32) NCHW plain too (the fused stage's fill spills a few registers there).
        "conv_input_grad": (conv_input_grad._conv_input_grad_kernel,
                            dict(dy_ptr="bf16", w_ptr="bf16", gp_ptr="bf16", dx_ptr="bf16"), ("inv_hw",),
                            conv_input_grad.gpu_configs,
                            [("bf16", dict(conv, FILL_POOLED=False, **_CHANNELS_LAST["conv_input_grad"])),
                             ("bf16", dict(conv, FILL_POOLED=True, **_CHANNELS_LAST["conv_input_grad"])),
                             ("fp32", dict(conv, FILL_POOLED=False, **_NCHW["conv_input_grad"]))]),
        "conv_weight_grad": (conv_weight_grad._conv_weight_grad_kernel,
                             dict(dy_ptr="bf16", x_ptr="bf16", dw_ptr="fp32", db_ptr="fp32"), (),
                             lambda dtype: conv_weight_grad._GPU_CONFIGS,
                             [("bf16", dict(conv, HAS_BIAS=True, **_CHANNELS_LAST["conv_weight_grad"]))]),
        # The shared-only input gradient of the linear layer: its K loop runs under a branch.
        "linear_input_grad": (linear_input_grad._linear_input_grad_kernel,
                              dict(dy_ptr="bf16", w_ptr="bf16", dx_ptr="bf16"), (),
                              lambda dtype: linear_input_grad._GPU_CONFIGS,
                              [("bf16", dict(DOT_PRECISION="tf32", **_CHANNELS_LAST["linear_input_grad"]))]),
    }
    for name, (fn, pointers, floats, gpu_configs, variants) in kernels.items():
        for dtype, variant in variants:
            typed = {arg: dtype if kind == "bf16" else kind for arg, kind in pointers.items()}
            for meta, warps, stages in gpu_configs(getattr(torch, _TORCH_DTYPES[dtype])):
                yield name, fn, typed, dict(meta, **variant), floats, warps, stages


def _compile(fn, pointers, constants, floats, arch: int, warps: int, stages: int):
    import triton
    import triton.language as tl

    if "ACC_DTYPE" in fn.arg_names:  # float32 accumulators: float64 runs only under the interpreter
        constants = {"ACC_DTYPE": tl.float32, **constants}
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        arg: "constexpr" if arg in constants else "*" + pointers[arg] if arg in pointers
        else "fp32" if arg in floats else "i32"
        for arg in fn.arg_names
    }
    # As the launcher tells the compiler for 16-byte-aligned pointers and sizes / strides that are
    # multiples of 16 (typical of VGG / ResNet shapes): what lets loads vectorize and pipeline.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg] == "i32" or signature[arg].startswith("*")}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def compile_with_ptxas_report(fn, pointers, constants, floats, arch: int, warps: int, stages: int):
    """(kernel, ptxas's -v report of it): compiled afresh (not from Triton's cache), with Triton's
    own ptxas options, whose report Triton prints when asked."""
    import contextlib
    import io

    import triton

    report = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(report):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        kernel = _compile(fn, pointers, constants, floats, arch, warps, stages)
    return kernel, report.getvalue()


def spilled_bytes(ptxas_report: str) -> int:
    """Bytes of registers spilled to local memory (stores + loads) in a ptxas -v report."""
    spills = [int(count) for count in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_report)]
    if not spills:
        raise RuntimeError(f"no spill counts in the ptxas report:\n{ptxas_report}")
    return sum(spills)


def async_copies(kernel) -> int:
    """Asynchronous global-to-shared copies in the kernel's TTGIR: the software pipeliner turns the
    loads of a loop it pipelines into these (cp.async), and leaves a loop it skips with plain loads."""
    return kernel.asm["ttgir"].count("async_copy_global_to_local")


def pipeline_depth(kernel) -> int:
    """Tiles in flight per operand: the leading dimension of the multi-buffered shared allocations
    the pipeliner makes for a loop's loads (0 when there are none)."""
    depths = re.findall(r"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", kernel.asm["ttgir"])
    return max((int(depth) for depth in depths), default=0)


# The kernels whose K loop sits under or holds a branch: the pipeliner skipping the loop is the risk there.
_BRANCHED = ("conv_input_grad", "conv_forward_pooled", "linear_input_grad")


def check_pipelining(archs: list[int]) -> int:
    count = 0
    for arch in archs:
        for name, fn, pointers, constants, floats, warps, stages in _pipelining_jobs(arch):
            kernel, report = compile_with_ptxas_report(fn, pointers, constants, floats, arch, warps, stages)
            depth = pipeline_depth(kernel)
            tile = "x".join(str(constants[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            fill = " fill" if constants.get("FILL_POOLED") else ""
            line = (f"sm_{arch} {name + fill:24s} {pointers[next(iter(pointers))]:4s} {tile:10s} warps={warps} "
                    f"stages={stages} shared={kernel.metadata.shared:6d} depth={depth}")
            problems = []
            spills = spilled_bytes(report)
            if spills:
                problems.append(f"{spills} bytes of spilled registers")
            if async_copies(kernel) == 0 or depth < 2:
                problems.append("no multi-buffered asynchronous copies: the K loop is not pipelined")
            if name in _BRANCHED:
                # One stage less must mean fewer tiles in flight. (Shared memory in bytes need not
                # shrink: the epilogue's layout conversion reuses it and can be the larger use.)
                shallower = _compile(fn, pointers, constants, floats, arch, warps, stages - 1)
                line += f" (num_stages={stages - 1}: shared={shallower.metadata.shared:6d} depth={pipeline_depth(shallower)})"
                if pipeline_depth(shallower) >= depth:
                    problems.append("the tiles in flight do not grow with num_stages")
            count += 1
            if problems:
                print(f"FAILED {line}: " + "; ".join(problems))
                return 1
            print(f"ok {line}", flush=True)
    print(f"{count} configurations compiled without spills, pipelined")
    return 0

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every autotuning configuration and dtype")
    parser.add_argument("--pipelining", action="store_true",
                        help="every configuration of the GEMM kernels: no spills, pipelined K loops")
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_compile_check: unset TRITON_INTERPRET (interpreted kernels do not compile)")
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        print("triton_compile_check: SKIP, this triton has no NVIDIA backend")
        return 3
    archs = [int(a) for a in args.arch.split(",")]
    started = time.time()
    if args.pipelining:
        status = check_pipelining(archs)
        print(f"{time.time() - started:.0f}s")
        return status
    count = 0
    for arch, name, fn, pointers, constants, floats, warps, stages in _jobs(args.all, archs):
        try:
            kernel = _compile(fn, pointers, constants, floats, arch, warps, stages)
        except Exception as error:
            print(f"FAILED sm_{arch} {name} {constants}: {type(error).__name__}: {error}")
            return 1
        count += 1
        variant = {k: v for k, v in constants.items() if k.isupper() and not k.startswith(("BLOCK", "GROUP", "K"))}
        print(f"ok sm_{arch} {name:18s} {pointers[next(iter(pointers))]:4s} shared={kernel.metadata.shared:6d} {variant}")
    print(f"{count} kernels compiled in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
