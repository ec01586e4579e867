"""The ARM paths' inner loops as an ARM CPU would run them, compiled here by llvmlite's AArch64
back end from the same IR builders the kernels use (``simd._int8_body``,
``simd_float._float_row_body``), with the optimizations numba applies (level 3).

    python tests/arm64/codegen.py            # instructions per 32-weight block, per path and CPU
    python tests/arm64/codegen.py --asm q40 dotprod cortex-a76   # one loop's assembly

The int8 body multiplies one packed group of ``GROUP_ROWS`` rows by a tile of tokens, so one
pass of its loop is ``GROUP_ROWS`` 32-weight blocks per token.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import llvmlite.binding as llvm  # noqa: E402
from llvmlite import ir  # noqa: E402

from dllama.kernels.jit import simd, simd_float  # noqa: E402
from dllama.kernels.jit.vector_ir import I8  # noqa: E402

TRIPLE = "aarch64-unknown-linux-gnu"
# Raspberry Pi 5, Apple M1 (both with DotProd), Raspberry Pi 4 (without).
CPUS = {"dotprod": ("cortex-a76", "apple-m1"), "neon": ("cortex-a72",)}
I64 = ir.IntType(64)


@dataclass(frozen=True)
class Loop:
    """The instructions of a compiled inner loop, from its label to its branch back."""

    lines: tuple[str, ...]

    @property
    def mnemonics(self) -> Counter:
        return Counter(line.split()[0] for line in self.lines)


def _compile(module: ir.Module, cpu: str) -> str:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    machine = llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=cpu, opt=3)
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(parsed, builder)
    return machine.emit_assembly(parsed)


def inner_loop(asm: str) -> Loop:
    """The one loop of a function: the lines from a label to the conditional branch back to it."""
    lines = [line.strip() for line in asm.splitlines()]
    for i, line in enumerate(lines):
        label = re.fullmatch(r"(\.LBB\d+_\d+):", line)
        if not label:
            continue
        for j in range(i + 1, len(lines)):
            if re.fullmatch(rf"b\.\w+\s+{re.escape(label[1])}", lines[j]):
                body = [x for x in lines[i + 1:j + 1] if x and not x.startswith((".", "//"))]
                return Loop(tuple(body))
    raise ValueError("no loop in the assembly")


def int8_loop(fmt: str, kind: str, cpu: str, n_tokens: int = 1) -> Loop:
    """The int8 body's loop (Q40 or Q80 weights, Q80 activations) for ``kind``'s path."""
    module = ir.Module("int8_body")
    module.triple = TRIPLE
    i8p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p, I64, I64] + [i8p] * (4 * n_tokens)), "body")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    w, w_off, nb = fn.args[:3]
    tokens = [tuple(fn.args[3 + 4 * k:7 + 4 * k]) for k in range(n_tokens)]
    simd._int8_body(builder, fmt, w, w_off, tokens, nb, ir.Constant(I64, 0), kind)
    builder.ret_void()
    return inner_loop(_compile(module, cpu))


def f16_loop(cpu: str) -> Loop:
    """The F16 weight rows' loop (float32 activations, one row, one token) with the hardware
    float16 conversion the ARM paths use."""
    module = ir.Module("f16_body")
    module.triple = TRIPLE
    i8p = I8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p, i8p, i8p, I64]), "body")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    w, x, out, nb = fn.args
    simd_float._float_row_body(builder, [(w, ir.Constant(I64, 0))], 2, [(x, out)], nb, True)
    builder.ret_void()
    return inner_loop(_compile(module, cpu))


def per_block(loop: Loop, n_tokens: int = 1) -> float:
    """Instructions per 32-weight block of one row and one token."""
    return len(loop.lines) / (simd.GROUP_ROWS * n_tokens)


def table() -> list[tuple[str, str, str, int, int, float]]:
    """(format, path, CPU, tokens, loop instructions, per block) for every ARM case."""
    rows = []
    for fmt in ("q40", "q80"):
        for kind, cpus in CPUS.items():
            for cpu in cpus:
                for n_tokens in (1, 4):
                    loop = int8_loop(fmt, kind, cpu, n_tokens)
                    rows.append((fmt, kind, cpu, n_tokens, len(loop.lines), per_block(loop, n_tokens)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asm", nargs=3, metavar=("FMT", "PATH", "CPU"), help="print one loop: q40|q80 dotprod|neon CPU")
    args = p.parse_args(argv)
    if args.asm:
        fmt, kind, cpu = args.asm
        print("\n".join(int8_loop(fmt, kind, cpu).lines))
        return 0
    print("| weights | path | CPU | tokens | loop instructions | per 32-weight block and token |")
    print("|---|---|---|---|---|---|")
    for fmt, kind, cpu, n_tokens, count, block in table():
        print(f"| {fmt} | {kind} | {cpu} | {n_tokens} | {count} | {block:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
