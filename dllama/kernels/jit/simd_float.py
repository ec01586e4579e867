"""The F16 and F32 weight products in LLVM vector code (``vector_ir`` explains ``path``).

These weights keep their stored row-major layout (for a memory-mapped file: no copy at all), so
a kernel streams one row at a time (two when decoding). F16 values become float32 in vector
registers (F16C's ``vcvtph2ps`` on x86, exact bit arithmetic on the portable path); products
and sums are float32 fused multiply-adds on 16 lanes, which LLVM lowers to whatever vectors the
CPU has.

A row's dot product with a token's activation has the same bits whatever the tile (alone, or
beside other tokens of a batch: the serving engine batches the rows of different requests and
promises each the text it gets alone): one chain of 16 lanes, to which each block of 32 values
adds its first 16 products, then its last 16; the lanes are summed by halving at the end.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from dllama.kernels.jit.simd import PREFETCH
from dllama.kernels.jit.vector_ir import (F32, I16, by_f16c, half_to_float, load, prefetch, reduce_add_f32,
                                          row_ptr, store_f32, token_rows, vec)

I64 = ir.IntType(64)
BLOCK = 32  # values per step of a row


def _float_row_body(builder, rows, item: int, tokens, nblocks, f16c: bool) -> None:
    """Dot products of weight rows with token activations: ``rows`` holds (row pointer, output
    byte offset) pairs, ``tokens`` (activation pointer, output row pointer) pairs, ``item`` the
    bytes of a weight. One chain of sums per (row, token): a tile of 4 tokens keeps 4 chains in
    flight (4 accumulators of 16 lanes: 8 of AVX2's 16 ymm registers; two chains per token would
    take all 16), decoding 2 rows at once keeps 2 (so that consecutive blocks do not wait on
    each other's additions)."""
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 16), [0.0] * 16)) for _ in tokens]
           for _ in rows]
    with cgutils.for_range(builder, nblocks) as loop:
        b = loop.index
        at = builder.mul(b, ir.Constant(I64, BLOCK * item))
        xb = builder.mul(b, ir.Constant(I64, BLOCK * 4))
        for i, (w, _) in enumerate(rows):
            # Into L2 only: measured over 512 MB on the project's machine, F16 rows then stream at
            # 15-17 GB/s on one thread instead of 10.5 (prefetcht0), as fast as F32's (14-15).
            prefetch(builder, w, builder.add(at, ir.Constant(I64, PREFETCH)), locality=2)
            if item == 2:
                halves = [half_to_float(builder, load(builder, w, builder.add(at, ir.Constant(I64, 32 * h)),
                                                      vec(I16, 16)), 16, f16c) for h in range(2)]
            else:
                halves = [load(builder, w, builder.add(at, ir.Constant(I64, 64 * h)), vec(F32, 16)) for h in range(2)]
            for k, (xf, _) in enumerate(tokens):
                slot = acc[i][k]
                total = builder.load(slot)
                for h in range(2):
                    x = load(builder, xf, builder.add(xb, ir.Constant(I64, 64 * h)), vec(F32, 16))
                    total = builder.fadd(total, builder.fmul(halves[h], x, flags=["contract"]), flags=["contract"])
                builder.store(total, slot)
    for i, (_, out_off) in enumerate(rows):
        for k, (_, out) in enumerate(tokens):
            store_f32(builder, out, out_off, reduce_add_f32(builder, builder.load(acc[i][k]), 16))


def _make_float_row(n_rows: int, n_tokens: int):
    @intrinsic
    def float_row_tile(typingctx, w, row, xf, t0, nblocks, out, path):
        sig = types.void(w, types.intp, xf, types.intp, types.intp, out, types.intp)
        item = w.dtype.bitwidth // 8

        def codegen(context, builder, signature, args):
            wa, row_v, _, t0_v, nb_v, _, path_v = args
            rows = []
            for i in range(n_rows):
                r = builder.add(row_v, ir.Constant(row_v.type, i))
                rows.append((row_ptr(context, builder, signature.args[0], wa, r), builder.mul(r, ir.Constant(r.type, 4))))
            tokens = token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 5))
            by_f16c(builder, path_v, lambda f16c: _float_row_body(builder, rows, item, tokens, nb_v, f16c))
            return context.get_dummy_value()

        return sig, codegen

    return float_row_tile


# float_row_tileN(w, row, xf, t0, nblocks, out, path): out[t0 + k, row] = the dot product of the
# first nblocks * 32 values of row ``row`` of w (float16 bits as uint16, or float32) with those
# of xf[t0 + k], for k < N; the caller adds the row's last values past a whole block.
# float_rows2_tile1: the same for rows ``row`` and ``row + 1`` and the one token t0 (decoding).
float_row_tile1 = _make_float_row(1, 1)
float_row_tile4 = _make_float_row(1, 4)
float_rows2_tile1 = _make_float_row(2, 1)
