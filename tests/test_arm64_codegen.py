"""Proof from the code: the ARM paths' inner loops, compiled on this host by llvmlite's AArch64
back end for a Raspberry Pi 5 core (cortex-a76), an Apple M1 (apple-m1) and a Raspberry Pi 4
core (cortex-a72), hold the instructions intended and nothing scalar (tests/arm64/codegen.py
builds them; `python tests/arm64/codegen.py` prints the counts)."""
from __future__ import annotations

import re

import pytest

from dllama.kernels.jit import simd
from tests.arm64 import codegen

# Instructions that may work on general registers: the loop's counter, addresses, prefetches.
CONTROL = {"add", "sub", "subs", "cmp", "lsl", "mov", "prfm", "cbz", "cbnz"}
LOADS_STORES = {"ldr", "ldur", "ldp", "ld1", "ld1r", "str", "stur", "stp", "st1"}
SIMD_REGISTER = re.compile(r"(\{\s*)?(v\d+(\.\d+[bhsd])?|[qdsh]\d+)(\[\d+\])?")


def scalar_data_instructions(loop: codegen.Loop) -> list[str]:
    """Lines that move or compute data outside the SIMD registers: a scalar fallback."""
    found = []
    for line in loop.lines:
        mnemonic, *rest = line.split(None, 1)
        first = rest[0].split(",")[0].strip() if rest else ""
        if mnemonic.startswith("b.") or (mnemonic in CONTROL and not first.startswith("v")):
            continue
        if not SIMD_REGISTER.match(first):
            found.append(line)
    return found


DOTPROD_CASES = [(fmt, cpu, n) for fmt in ("q40", "q80") for cpu in codegen.CPUS["dotprod"] for n in (1, 4)]


@pytest.mark.parametrize("fmt, cpu, n_tokens", DOTPROD_CASES)
def test_the_dotprod_loop_multiplies_with_sdot_alone(fmt, cpu, n_tokens):
    loop = codegen.int8_loop(fmt, "dotprod", cpu, n_tokens)
    ops = loop.mnemonics
    # Two sdot per row and token: values 0-15, then 16-31 of the block.
    assert ops["sdot"] == 2 * simd.GROUP_ROWS * n_tokens, loop.lines
    assert not {"smull", "smull2", "smlal", "smlal2", "saddlp", "mul", "madd"} & set(ops), ops
    assert ops["fcvtl"] >= 1 and ops["scvtf"] == simd.GROUP_ROWS * n_tokens  # scales by fcvtl, sums by scvtf
    assert scalar_data_instructions(loop) == []
    # One block of one row: 12 instructions alone, fewer per token in a tile (measured 8.2-12.0).
    assert codegen.per_block(loop, n_tokens) <= 12.5


@pytest.mark.parametrize("fmt", ["q40", "q80"])
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_the_neon_loop_widens_smull_products_without_sdot(fmt, n_tokens):
    loop = codegen.int8_loop(fmt, "neon", "cortex-a72", n_tokens)
    ops = loop.mnemonics
    assert "sdot" not in ops and "udot" not in ops, ops  # a Cortex-A72 has no DotProd: SIGILL
    # Per row, token and half of the block's 16-value halves: one smull-type product into int16
    # lanes and one smlal-type adding the other half's, widened by saddlp, joined by addp.
    rows = simd.GROUP_ROWS * n_tokens
    assert ops["smull"] + ops["smull2"] == 2 * rows and ops["smlal"] + ops["smlal2"] == 2 * rows, ops
    assert ops["saddlp"] == 2 * rows and ops["addp"] == rows, ops
    assert scalar_data_instructions(loop) == []
    assert codegen.per_block(loop, n_tokens) <= 18


@pytest.mark.parametrize("cpu", ["cortex-a76", "cortex-a72", "apple-m1"])
def test_float16_rows_convert_with_fcvtl(cpu):
    loop = codegen.f16_loop(cpu)
    ops = loop.mnemonics
    assert ops["fcvtl"] + ops["fcvtl2"] == 8 and ops["fmla"] == 8, ops  # 32 values: 8 x 4 lanes
    assert scalar_data_instructions(loop) == []


def test_the_check_finds_a_scalar_loop():
    """The scalar check itself: a byte-by-byte loop is what it must catch."""
    loop = codegen.Loop(("ldrb w9, [x0, x8]", "ldrsb w10, [x1, x8]", "madd w11, w9, w10, w11", "add x8, x8, #1",
                         "cmp x8, x2", "b.lt .LBB0_1"))
    assert scalar_data_instructions(loop) == ["ldrb w9, [x0, x8]", "ldrsb w10, [x1, x8]", "madd w11, w9, w10, w11"]
