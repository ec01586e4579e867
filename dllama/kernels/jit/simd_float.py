"""The F16 and F32 weight products in LLVM vector code (``vector_ir`` explains ``path``).

These weights keep their stored row-major layout (for a memory-mapped file: no copy at all), so
a kernel streams one row at a time. F16 values become float32 in vector registers (F16C's
``vcvtph2ps`` on x86, exact bit arithmetic on the portable path); products and sums are
float32 fused multiply-adds on 16 lanes, which LLVM lowers to whatever vectors the CPU has.
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


def _float_row_body(builder, w, item: int, tokens, nblocks, out_off, f16c: bool) -> None:
    """Dot products of one weight row (``item`` bytes per value) with each token's activation."""
    # Decoding keeps two chains of sums so that consecutive blocks do not wait on each other's
    # additions; a tile of tokens has one chain per token already.
    chains = 2 if len(tokens) == 1 else 1
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 16), [0.0] * 16)) for _ in range(chains)]
           for _ in tokens]
    with cgutils.for_range(builder, nblocks) as loop:
        b = loop.index
        at = builder.mul(b, ir.Constant(I64, BLOCK * item))
        # Into L2 only: measured over 512 MB on the project's machine, F16 rows then stream at
        # 15-17 GB/s on one thread instead of 10.5 (prefetcht0), as fast as F32's (14-15).
        prefetch(builder, w, builder.add(at, ir.Constant(I64, PREFETCH)), locality=2)
        if item == 2:
            halves = [half_to_float(builder, load(builder, w, builder.add(at, ir.Constant(I64, 32 * h)), vec(I16, 16)),
                                    16, f16c) for h in range(2)]
        else:
            halves = [load(builder, w, builder.add(at, ir.Constant(I64, 64 * h)), vec(F32, 16)) for h in range(2)]
        xb = builder.mul(b, ir.Constant(I64, BLOCK * 4))
        for k, (xf, _) in enumerate(tokens):
            for h in range(2):
                x = load(builder, xf, builder.add(xb, ir.Constant(I64, 64 * h)), vec(F32, 16))
                slot = acc[k][h % chains]
                builder.store(builder.fadd(builder.load(slot), builder.fmul(halves[h], x, flags=["contract"]),
                                           flags=["contract"]), slot)
    for k, (_, out) in enumerate(tokens):
        total = builder.load(acc[k][0])
        if chains == 2:
            total = builder.fadd(total, builder.load(acc[k][1]))
        store_f32(builder, out, out_off, reduce_add_f32(builder, total, 16))


def _make_float_row(n_tokens: int):
    @intrinsic
    def float_row_tile(typingctx, w, row, xf, t0, nblocks, out, path):
        sig = types.void(w, types.intp, xf, types.intp, types.intp, out, types.intp)
        item = w.dtype.bitwidth // 8

        def codegen(context, builder, signature, args):
            wa, row_v, _, t0_v, nb_v, _, path_v = args
            wp = row_ptr(context, builder, signature.args[0], wa, row_v)
            tokens = token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 5))
            out_bytes = builder.mul(row_v, ir.Constant(row_v.type, 4))
            by_f16c(builder, path_v, lambda f16c: _float_row_body(builder, wp, item, tokens, nb_v, out_bytes, f16c))
            return context.get_dummy_value()

        return sig, codegen

    return float_row_tile


# float_row_tileN(w, row, xf, t0, nblocks, out, path): out[t0 + k, row] = the dot product of the
# first nblocks * 32 values of row ``row`` of w (float16 bits as uint16, or float32) with those
# of xf[t0 + k], for k < N; the caller adds the row's last values past a whole block.
float_row_tile1 = _make_float_row(1)
float_row_tile4 = _make_float_row(4)
