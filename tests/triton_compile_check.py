"""Compiles the Triton kernels of dfs_kernels for NVIDIA GPUs on a machine without one.

Triton lowers a kernel to PTX and assembles it with the ptxas its wheel bundles, with no driver
involved, so a CPU-only CI can check that every kernel still compiles for sm_80 / sm_90 with its
GPU autotuning configurations, dtypes and constexpr variants (the interpreter, which runs the
numerical tests on CPU, never compiles anything). Unit strides are passed as the constants Triton's
launcher specializes them to, as for NCHW / NHWC tensors at run time.

    python tests/triton_compile_check.py            # one configuration per kernel variant (CI)
    python tests/triton_compile_check.py --all      # every autotuning configuration

Must run without TRITON_INTERPRET (the kernels are then JIT functions). Prints one line per
compile with its shared memory, and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _jobs(all_configs: bool, archs: list[int]):
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
            for meta, warps, stages in pick(conv_input_grad._GPU_CONFIGS):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every autotuning configuration and dtype")
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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.time()
    count = 0
    for arch, name, fn, pointers, constants, floats, warps, stages in _jobs(args.all, [int(a) for a in args.arch.split(",")]):
        if "ACC_DTYPE" in fn.arg_names:  # float32 accumulation: float64 runs only under the interpreter
            constants = dict(constants, ACC_DTYPE=triton.language.float32)
        signature = {
            arg: "constexpr" if arg in constants else "*" + pointers[arg] if arg in pointers
            else "fp32" if arg in floats else "i32"
            for arg in fn.arg_names
        }
        # As the launcher tells the compiler for 16-byte-aligned pointers and sizes / strides that are
        # multiples of 16 (typical of VGG / ResNet shapes): what lets loads vectorize and pipeline.
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if signature[arg] == "i32" or signature[arg].startswith("*")}
        source = ASTSource(fn, signature, constants, attrs)
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
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
