"""Compile every kernel specialization the Triton backend launches for an NVIDIA GPU (sm_90 by
default), on a machine without one: the launches are recorded instead of run, then handed to
Triton's compiler and to ptxas, which report registers and spills.

The interpreter tests run the kernels' arithmetic; this finds what only the compiler refuses
(types of loop-carried values, constexpr branches, shapes). It must run in a process where
Triton was imported without ``TRITON_INTERPRET``:

    python -m tests.backends.triton_compile [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from batchnorm.backends import triton as backend

_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
KERNELS = ("moments_partials", "moments_finalize", "normalize", "gradient_partials",
           "gradient_finalize", "gradient_input")


def _argument_type(value) -> str:
    """A launch argument's type in Triton's signature notation."""
    if isinstance(value, torch.Tensor):
        return _POINTER[value.dtype]
    return "i32" if isinstance(value, int) else "fp32"


class _Recorder:
    def __init__(self, name: str, launches: dict) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **options):
            signature = tuple(map(_argument_type, args))
            key = (self.name, signature, tuple(sorted(options.items())))
            self.launches.setdefault(key, (args, options))
        return launch


def record_launches(quick: bool = False) -> dict:
    """Every distinct launch of forward and backward over layouts, dtypes and options."""
    launches: dict = {}
    recorder = SimpleNamespace(**{name: _Recorder(name, launches) for name in KERNELS})
    gpu = backend.Profile(tile_bytes=8192, block_channels=128, programs=132 * 32,
                          finalize_block=(16, 128))
    original = backend.load_kernels, backend.profile_for
    backend.load_kernels, backend.profile_for = (lambda: recorder), (lambda device: gpu)
    try:
        shapes = [((32, 256, 56, 56), None), ((32, 256, 56, 56), torch.channels_last),
                  ((20, 6, 65536), None), ((256, 1000), None)]
        dtypes = [torch.float32] if quick else list(_POINTER)
        for shape, memory_format in shapes:
            for dtype in dtypes:
                x = torch.empty(shape, dtype=dtype)
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                weight = torch.ones(shape[1])
                stats = torch.ones(shape[1])
                for activation in ("identity", "relu"):
                    for affine, residual in ((True, x), (False, None)):
                        w, b = (weight, weight) if affine else (None, None)
                        backend.forward(x, w, b, 1e-5, activation=activation, residual=residual)
                        backend.forward(x, w, b, 1e-5, mean=stats, variance=stats,
                                        activation=activation, residual=residual)
                        for train in (True, False):
                            backend.backward(x, x, stats, stats, w, b, 1e-5, (True, True, True),
                                             train=train, activation=activation,
                                             residual=residual, need_residual=residual is not None)
                            backend.backward(x, x, stats, stats, w, b, 1e-5,
                                             (False, True, True), train=train,
                                             activation=activation, residual=residual)
    finally:
        backend.load_kernels, backend.profile_for = original
    return launches


def fullest(launches: dict) -> dict:
    """One launch per kernel and layout: the one with the most options switched on."""
    chosen: dict = {}
    for key, (args, options) in launches.items():
        group = (key[0], options.get("ROWS"))
        switched_on = sum(value is True for value in options.values())
        if group not in chosen or switched_on > chosen[group][0]:
            chosen[group] = (switched_on, key, (args, options))
    return {key: launch for _, key, launch in chosen.values()}


def compile_all(launches: dict, arch: int) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = backend.load_kernels()
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", arch, 32)
    suffix = "a" if arch >= 90 else ""  # Triton writes PTX for sm_90a and later
    report = []
    for (name, _, _), (args, options) in sorted(launches.items(), key=lambda item: str(item[0])):
        kernel = getattr(module, name)
        options = dict(options)
        num_warps = options.pop("num_warps", 4)
        parameters = list(inspect.signature(kernel.fn).parameters)
        signature = {p: _argument_type(a) for p, a in zip(parameters, args, strict=False)}
        signature.update({key: "constexpr" for key in options})
        constants = {(parameters.index(key),): value for key, value in options.items()}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=target, options={"num_warps": num_warps})
        usage = ""
        if os.path.exists(ptxas):
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
                source.write(compiled.asm["ptx"])
                source.flush()
                verbose = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source.name,
                                          "-o", os.devnull], capture_output=True, text=True,
                                         check=True).stderr
            usage = " ".join(line.split("ptxas info    : ")[-1] for line in verbose.splitlines()
                             if "registers" in line or "spill" in line)
        flags = {k: v for k, v in options.items() if not k.startswith("BLOCK")}
        blocks = {k: v for k, v in options.items() if k.startswith("BLOCK")}
        report.append(f"{name} {signature[parameters[0]]} {blocks} warps={num_warps} "
                      f"{flags}: {usage}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="float32 only")
    parser.add_argument("--fullest", action="store_true",
                        help="one launch per kernel and layout, with the most options on")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    launches = record_launches(args.quick)
    if args.fullest:
        launches = fullest(launches)
    report = compile_all(launches, args.arch)
    print("\n".join(report))
    print(f"{len(report)} specializations compiled for sm_{args.arch} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
