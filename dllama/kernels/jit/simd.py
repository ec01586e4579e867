"""The Q40 and Q80 weight products in LLVM vector code (``vector_ir`` explains ``path``).

numba's own loops over Q40 nibbles reach a tenth of the memory bandwidth, and over Q80 bytes a
thirtieth; these intrinsics emit the vector instructions directly.

Packed weights (``packing``) hold ``GROUP_ROWS`` rows interleaved block by block, so a row
group streams through memory as one run: one record per (row group, block) of the rows'
``GROUP_ROWS`` float16 scales, then

- Q40 (``Q40_RECORD``): each row's 16 nibble bytes (byte j: value j low, value j + 16 high);
- Q80 (``Q80_RECORD``): each row's int8 values 0-15, then each row's values 16-31.

Either way one 64-byte run holds the four rows' values 0-15 (after splitting Q40's nibbles) and
another their values 16-31, so both formats share the int8 products: 32 bytes serve a pair of
rows against the activation's halves stored twice (``Q80_ACT_BYTES``), 64 bytes all four rows
against those halves broadcast. The products need one unsigned operand: Q40 multiplies its
nibbles (value + 8), VNNI's Q80 its bits with the top one flipped (value + 128), and the
activation's correction lanes take the offset away again; AVX2's ``pmaddubsw`` would saturate
on Q80's offset, so there it multiplies |w| by x carrying w's sign. AArch64's products are
signed, one row at a time (``_int8_arm``), into the same lanes.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from dllama.kernels.jit.vector_ir import (  # noqa: F401 (the paths and host features are re-exported)
    F32, HOST_HAS_AVX2, HOST_HAS_AVX512, HOST_HAS_DOTPROD, HOST_HAS_NEON, HOST_HAS_VNNI, I8, I16, I32,
    PATH_AVX2, PATH_AVX512, PATH_DOTPROD, PATH_NEON, PATH_PORTABLE, PATH_VNNI, by_f16c, by_path, byte_ptr,
    half_to_float, intrinsic_fn, load, prefetch, reduce_add_f32, splat, store_f32, token_rows, vec)

GROUP_ROWS = 4
# Bytes ahead of the current record to prefetch. Measured on the project's 2-core machine
# (memory bandwidth 16 GB/s on one thread, 26-30 on two), streaming 453 MB of Q40 weights on
# two threads: 256 -> 17.6 GB/s, 1024 -> 19.3, 2048 -> 21.2, 4096-8192 -> 28-31, 12288 -> 25.
PREFETCH = 6144
Q40_RECORD = GROUP_ROWS * 2 + GROUP_ROWS * 16  # bytes per (row group, block)
Q80_RECORD = GROUP_ROWS * 2 + GROUP_ROWS * 32
RECORD = {"q40": Q40_RECORD, "q80": Q80_RECORD}
Q80_CORR_LANES = 8  # int32 lanes of the per-block activation correction (see q40_q80_tileN)
# A Q80 activation block as the int8 products read it: values 0-15 twice, then 16-31 twice.
Q80_ACT_BYTES = 64


I64 = ir.IntType(64)


def _c(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _values(builder, fmt: str, w, rec, first_row: int, n_rows: int, signed: bool) -> tuple[ir.Value, ir.Value]:
    """Values 0-15 and 16-31 of rows first_row .. first_row + n_rows - 1 of one record, as two
    <16 n_rows x i8>: the true int8 values (``signed``), or the unsigned ones the int8 products
    multiply (Q40: nibbles, value + 8; Q80: value + 128)."""
    n = 16 * n_rows
    at = builder.add(rec, _c(2 * GROUP_ROWS + 16 * first_row))
    if fmt == "q40":
        q = load(builder, w, at, vec(I8, n))
        mask = ir.Constant(vec(I8, n), [0x0F] * n)
        halves = (builder.and_(q, mask), builder.and_(builder.lshr(q, ir.Constant(vec(I8, n), [4] * n)), mask))
        offset = 8
    else:
        halves = (load(builder, w, at, vec(I8, n)), load(builder, w, builder.add(at, _c(16 * GROUP_ROWS)), vec(I8, n)))
        offset = -128
    if signed == (fmt == "q80"):
        return halves
    return tuple(builder.sub(h, ir.Constant(vec(I8, n), [offset] * n)) for h in halves)


def _correction(builder, fmt: str, corr: ir.Value, n: int) -> ir.Value:
    """The activation's -8 * sum(x) lanes as this format's offset needs them (Q80: -128 * sum)."""
    return corr if fmt == "q40" else builder.shl(corr, ir.Constant(vec(I32, n), [4] * n))


def _record(builder, fmt: str, w, w_off, b, hardware_f16: bool) -> tuple[ir.Value, ir.Value]:
    """Block ``b``'s record of the group at ``w_off``: its byte offset (the records ahead are
    prefetched) and its ``GROUP_ROWS`` scales as a <GROUP_ROWS x float>."""
    rec = builder.add(w_off, builder.mul(b, _c(RECORD[fmt])))
    for ahead in range(0, RECORD[fmt], 64):
        prefetch(builder, w, builder.add(rec, _c(PREFETCH + ahead)))
    return rec, half_to_float(builder, load(builder, w, rec, vec(I16, GROUP_ROWS)), GROUP_ROWS, hardware_f16)


def _int8_body(builder, fmt: str, w, w_off, tokens, nb, out_off, kind: str) -> None:
    """Dot products of the GROUP_ROWS rows of one packed group with each token's Q80 activation.

    ``tokens`` holds (xq, xd, xcorr, out) byte pointers per token; ``out_off`` is in bytes.
    Each weight block is loaded (and split into nibbles) once for all the tokens, so prefill
    reads a weight once per tile of tokens.
    """
    g = GROUP_ROWS
    if kind == "portable":
        for tok in tokens:
            _int8_portable(builder, fmt, w, w_off, tok, nb, out_off)
        return
    if kind in ("dotprod", "neon"):
        _int8_arm(builder, fmt, w, w_off, tokens, nb, out_off, kind == "dotprod")
        return
    if kind == "avx512":
        _int8_avx512(builder, fmt, w, w_off, tokens, nb, out_off)
        return
    # Two rows at once: 32 bytes hold values 0-15 of rows r and r+1 side by side, and the
    # activation is stored twice in the matching order, so one int8 product serves two rows;
    # lanes 0-3 of an accumulator sum row r, lanes 4-7 row r+1.
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 8), [0.0] * 8)) for _ in range(g // 2)]
           for _ in tokens]
    v8i32 = vec(I32, 8)
    if kind == "vnni":  # u8 x s8 products summed into int32 lanes in one instruction
        dpbusd = intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.256", v8i32, [v8i32] * 3)
    else:
        maddubs = intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [vec(I8, 32)] * 2)
        maddwd = intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [vec(I16, 16)] * 2)
        sign = intrinsic_fn(builder, "llvm.x86.avx2.psign.b", vec(I8, 32), [vec(I8, 32)] * 2)
        absolute = intrinsic_fn(builder, "llvm.abs.v32i8", vec(I8, 32), [vec(I8, 32), ir.IntType(1)])
        ones16 = ir.Constant(vec(I16, 16), [1] * 16)
    # AVX2's Q80 products take the signed values (|w| times x with w's sign), the rest unsigned.
    signed = kind == "avx2" and fmt == "q80"
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec, dw = _record(builder, fmt, w, w_off, b, True)
        # Each pair's two scales spread over its accumulator's lanes, once for all tokens.
        dw_pairs = [builder.shuffle_vector(dw, dw, ir.Constant(vec(I32, 8), [2 * p] * 4 + [2 * p + 1] * 4))
                    for p in range(g // 2)]
        pairs = [_values(builder, fmt, w, rec, 2 * p, 2, signed) for p in range(g // 2)]
        if signed:
            pairs = [[(h, builder.call(absolute, [h, ir.Constant(ir.IntType(1), 0)])) for h in pair] for pair in pairs]
        xb = builder.mul(b, _c(Q80_ACT_BYTES))
        for k, (xq, xd, xcorr, _) in enumerate(tokens):
            x_lo = load(builder, xq, xb, vec(I8, 32))
            x_hi = load(builder, xq, builder.add(xb, _c(32)), vec(I8, 32))
            corr = _correction(builder, fmt, load(builder, xcorr, builder.mul(b, _c(4 * Q80_CORR_LANES)), v8i32), 8)
            dx = splat(builder, load(builder, xd, builder.mul(b, _c(4)), F32), 8)
            if kind == "vnni":
                x_lo32, x_hi32 = builder.bitcast(x_lo, v8i32), builder.bitcast(x_hi, v8i32)
            for p, (lo, hi) in enumerate(pairs):
                if kind == "vnni":
                    p32 = builder.call(dpbusd, [corr, builder.bitcast(lo, v8i32), x_lo32])
                    p32 = builder.call(dpbusd, [p32, builder.bitcast(hi, v8i32), x_hi32])
                elif signed:  # each pmaddubsw pair sum may reach 2 * 128 * 127: widen them apart
                    p32 = None
                    for (value, magnitude), x in ((lo, x_lo), (hi, x_hi)):
                        part = builder.call(maddwd, [builder.call(maddubs, [magnitude, builder.call(sign, [x, value])]),
                                                     ones16])
                        p32 = part if p32 is None else builder.add(p32, part)
                else:  # nibble products (at most 2 * 15 * 127 a pair) sum safely in int16
                    p16 = builder.add(builder.call(maddubs, [lo, x_lo]), builder.call(maddubs, [hi, x_hi]))
                    p32 = builder.add(builder.call(maddwd, [p16, ones16]), corr)
                f = builder.sitofp(p32, vec(F32, 8))
                s = builder.fmul(dw_pairs[p], dx)
                cur = builder.load(acc[k][p])
                builder.store(builder.fadd(cur, builder.fmul(f, s, flags=["contract"]), flags=["contract"]), acc[k][p])
    for k, tok in enumerate(tokens):
        out = tok[3]
        for r in range(g):
            v = builder.load(acc[k][r // 2])
            half = 4 * (r % 2)
            quarter = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 4), list(range(half, half + 4))))
            store_f32(builder, out, builder.add(out_off, _c(4 * r)), reduce_add_f32(builder, quarter, 4))


def _int8_avx512(builder, fmt: str, w, w_off, tokens, nb, out_off) -> None:
    """The 512-bit form: the group's four rows' values 0-15 in one register and 16-31 in
    another; the activation's 32-byte halves are broadcast to all four 128-bit lanes, so lanes
    4r..4r+3 sum row r."""
    g = GROUP_ROWS
    v16i32 = vec(I32, 16)
    acc = [cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 16), [0.0] * 16)) for _ in tokens]
    dpbusd = intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32] * 3)
    twice = ir.Constant(vec(I32, 64), list(range(32)) * 2)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec, dw = _record(builder, fmt, w, w_off, b, True)
        dw16 = builder.shuffle_vector(dw, dw, ir.Constant(vec(I32, 16), [r for r in range(g) for _ in range(4)]))
        lo, hi = (builder.bitcast(h, v16i32) for h in _values(builder, fmt, w, rec, 0, g, False))
        xb = builder.mul(b, _c(Q80_ACT_BYTES))
        for k, (xq, xd, xcorr, _) in enumerate(tokens):
            x_lo = load(builder, xq, xb, vec(I8, 32))
            x_hi = load(builder, xq, builder.add(xb, _c(32)), vec(I8, 32))
            x_lo = builder.bitcast(builder.shuffle_vector(x_lo, x_lo, twice), v16i32)
            x_hi = builder.bitcast(builder.shuffle_vector(x_hi, x_hi, twice), v16i32)
            corr = load(builder, xcorr, builder.mul(b, _c(4 * Q80_CORR_LANES)), vec(I32, 8))
            corr = _correction(builder, fmt, builder.shuffle_vector(corr, corr, ir.Constant(vec(I32, 16), list(range(8)) * 2)), 16)
            dx = splat(builder, load(builder, xd, builder.mul(b, _c(4)), F32), 16)
            p32 = builder.call(dpbusd, [builder.call(dpbusd, [corr, lo, x_lo]), hi, x_hi])
            f = builder.sitofp(p32, vec(F32, 16))
            cur = builder.load(acc[k])
            scaled = builder.fmul(f, builder.fmul(dw16, dx), flags=["contract"])
            builder.store(builder.fadd(cur, scaled, flags=["contract"]), acc[k])
    for k, tok in enumerate(tokens):
        v = builder.load(acc[k])
        for r in range(g):
            quarter = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 4), list(range(4 * r, 4 * r + 4))))
            store_f32(builder, tok[3], builder.add(out_off, _c(4 * r)), reduce_add_f32(builder, quarter, 4))


def _int8_arm(builder, fmt: str, w, w_off, tokens, nb, out_off, dotprod: bool) -> None:
    """AArch64: each row's block product in 4 int32 lanes, lane j summing the products of values
    4j..4j+3 and 16+4j..16+4j+3. These are ``sdot``'s lanes, and the x86 paths' (``vpdpbusd``,
    ``pmaddwd``): the float arithmetic that follows is theirs, operation for operation, so every
    path gives the same bits. Without DotProd the lanes come from ``smull`` products of values k
    and 16 + k summed in int16 (at most 2 * 128 * 127: the activation is within +-127), widened
    pairwise (``saddlp``) and added pairwise again (``addp``). Q40 multiplies its nibbles and
    starts from the activation's -8 * sum lanes, as the x86 paths do; Q80 its signed values."""
    g = GROUP_ROWS
    v4i32, v16i8, v8i8, v8i16 = vec(I32, 4), vec(I8, 16), vec(I8, 8), vec(I16, 8)
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 4), [0.0] * 4)) for _ in range(g)]
           for _ in tokens]
    if dotprod:
        sdot = intrinsic_fn(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
    else:
        smull = intrinsic_fn(builder, "llvm.aarch64.neon.smull.v8i16", v8i16, [v8i8, v8i8])
        saddlp = intrinsic_fn(builder, "llvm.aarch64.neon.saddlp.v4i32.v8i16", v4i32, [v8i16])
        addp = intrinsic_fn(builder, "llvm.aarch64.neon.addp.v4i32", v4i32, [v4i32, v4i32])
        eighths = [ir.Constant(vec(I32, 8), list(range(8 * h, 8 * h + 8))) for h in range(2)]

    def lanes(start, lo, hi, x_lo, x_hi):
        if dotprod:
            return builder.call(sdot, [builder.call(sdot, [start, lo, x_lo]), hi, x_hi])
        pairs = []
        for half in eighths:
            def part(a, b):
                return builder.shuffle_vector(a, a, half), builder.shuffle_vector(b, b, half)
            p16 = builder.add(builder.call(smull, part(lo, x_lo)), builder.call(smull, part(hi, x_hi)))
            pairs.append(builder.call(saddlp, [p16]))
        return builder.add(builder.call(addp, pairs), start)

    zero = ir.Constant(v4i32, [0] * 4)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec, dw = _record(builder, fmt, w, w_off, b, True)
        rows = [_values(builder, fmt, w, rec, r, 1, fmt == "q80") for r in range(g)]
        xb = builder.mul(b, _c(Q80_ACT_BYTES))
        for k, (xq, xd, xcorr, _) in enumerate(tokens):
            x_lo = load(builder, xq, xb, v16i8)
            x_hi = load(builder, xq, builder.add(xb, _c(32)), v16i8)
            start = load(builder, xcorr, builder.mul(b, _c(4 * Q80_CORR_LANES)), v4i32) if fmt == "q40" else zero
            dx = splat(builder, load(builder, xd, builder.mul(b, _c(4)), F32), 4)
            for r, (lo, hi) in enumerate(rows):
                f = builder.sitofp(lanes(start, lo, hi, x_lo, x_hi), vec(F32, 4))
                s = builder.fmul(splat(builder, builder.extract_element(dw, ir.Constant(I32, r)), 4), dx)
                cur = builder.load(acc[k][r])
                builder.store(builder.fadd(cur, builder.fmul(f, s, flags=["contract"]), flags=["contract"]), acc[k][r])
    for k, tok in enumerate(tokens):
        for r in range(g):
            store_f32(builder, tok[3], builder.add(out_off, _c(4 * r)), reduce_add_f32(builder, builder.load(acc[k][r]), 4))


def _int8_portable(builder, fmt: str, w, w_off, tok, nb, out_off) -> None:
    g = GROUP_ROWS
    xq, xd, xcorr, out = tok
    acc4 = cgutils.alloca_once_value(builder, ir.Constant(vec(F32, g), [0.0] * g))
    red = intrinsic_fn(builder, "llvm.vector.reduce.add.v32i32", I32, [vec(I32, 32)])
    both = ir.Constant(vec(I32, 32), list(range(32)))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec = builder.add(w_off, builder.mul(b, _c(RECORD[fmt])))
        prefetch(builder, w, builder.add(rec, _c(PREFETCH)))
        xb = builder.mul(b, _c(Q80_ACT_BYTES))
        dx = load(builder, xd, builder.mul(b, _c(4)), F32)
        dws = builder.fmul(half_to_float(builder, load(builder, w, rec, vec(I16, g)), g, False), splat(builder, dx, g))
        x = builder.shuffle_vector(load(builder, xq, xb, vec(I8, 16)), load(builder, xq, builder.add(xb, _c(32)), vec(I8, 16)),
                                   both)
        xs = builder.sext(x, vec(I16, 32))
        sums = ir.Constant(vec(I32, g), ir.Undefined)
        for r in range(g):
            lo, hi = _values(builder, fmt, w, rec, r, 1, True)
            q = builder.sext(builder.shuffle_vector(lo, hi, both), vec(I16, 32))
            prod = builder.mul(q, xs)  # |127 * 127| fits
            sums = builder.insert_element(sums, builder.call(red, [builder.sext(prod, vec(I32, 32))]), ir.Constant(I32, r))
        cur = builder.load(acc4)
        f = builder.sitofp(sums, vec(F32, g))
        builder.store(builder.fadd(cur, builder.fmul(f, dws, flags=["contract"]), flags=["contract"]), acc4)
    for r in range(g):
        store_f32(builder, out, builder.add(out_off, _c(4 * r)), builder.extract_element(builder.load(acc4), ir.Constant(I32, r)))


def _format(w) -> str:
    """The packed format of a weight array type: Q40 records are uint8, Q80 ones int8."""
    return "q40" if w.dtype == types.uint8 else "q80"


def _make_int8(n_tokens: int):
    @intrinsic
    def int8_tile(typingctx, w, w_off, xq, xd, xcorr, t0, nb, out, out_off, path):
        sig = types.void(w, types.intp, xq, xd, xcorr, types.intp, types.intp, out, types.intp, types.intp)
        fmt = _format(w)

        def codegen(context, builder, signature, args):
            wa, w_off_v, _, _, _, t0_v, nb_v, _, out_off_v, path_v = args
            wp = byte_ptr(context, builder, signature.args[0], wa)
            tokens = token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 3, 4, 7))
            out_bytes = builder.mul(out_off_v, ir.Constant(out_off_v.type, 4))
            by_path(builder, path_v, lambda kind: _int8_body(builder, fmt, wp, w_off_v, tokens, nb_v, out_bytes, kind),
                    fmt)
            return context.get_dummy_value()

        return sig, codegen

    return int8_tile


# Tokens multiplied per pass over a weight group in prefill: 4 tokens x 2 row pairs keep 8
# accumulators, half the 16 vector registers of AVX2; AVX-512 (32 registers, one accumulator
# per token) takes tiles of 8 (measured 12 % faster than 4).
TOKEN_TILE = 4
# int8_tileN(w, w_off, xq, xd, xcorr, t0, nb, out, out_off, path), for packed Q40 (uint8) or Q80
#   (int8) weights w: out[t0 + k, out_off + r] = dot(row r of the packed group at w[w_off:],
#   activation of token t0 + k) for r < GROUP_ROWS, k < N. The activation is Q80 (see
#   Q80_ACT_BYTES): xq int8 [T, blocks * 64], xd float32 block scales [T, blocks], xcorr int32
#   [T, blocks * 8] with -8 * sum(block values) in lanes 0 and 4: the products sum
#   (value + offset) * x and add the -offset * sum(x) that the unsigned operand's offset added.
int8_tile1 = _make_int8(1)
int8_tile2 = _make_int8(2)
int8_tile3 = _make_int8(3)
int8_tile4 = _make_int8(TOKEN_TILE)
int8_tile8 = _make_int8(8)


def _float_body(builder, fmt: str, w, w_off, tokens, nb, out_off, f16c: bool) -> None:
    """Dot products of a packed group's rows with float32 activations. Each row's 32 weights of a
    block become, once for all the tokens of the tile, the float32 values the reference
    multiplies by (int8 value times scale, exact). Plain vector IR, lowered by LLVM for whatever
    the CPU has (512, 256 or 128-bit registers)."""
    g = GROUP_ROWS
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec(F32, 16), [0.0] * 16)) for _ in range(g)]
           for _ in tokens]
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec, dw = _record(builder, fmt, w, w_off, b, f16c)
        lo, hi = _values(builder, fmt, w, rec, 0, g, True)
        xs = []
        for xf, _ in tokens:
            x = load(builder, xf, builder.mul(b, _c(128)), vec(F32, 32))
            xs.append([builder.shuffle_vector(x, x, ir.Constant(vec(I32, 16), list(range(16 * h, 16 * h + 16))))
                       for h in range(2)])
        for r in range(g):
            d = splat(builder, builder.extract_element(dw, ir.Constant(I32, r)), 16)
            wd = [builder.fmul(builder.sitofp(builder.shuffle_vector(h, h, ir.Constant(vec(I32, 16), list(range(16 * r, 16 * r + 16)))),
                                              vec(F32, 16)), d) for h in (lo, hi)]
            for k, x in enumerate(xs):
                cur = builder.load(acc[k][r])
                for h in range(2):
                    cur = builder.fadd(cur, builder.fmul(wd[h], x[h], flags=["contract"]), flags=["contract"])
                builder.store(cur, acc[k][r])
    for k, (_, out) in enumerate(tokens):
        for r in range(g):
            store_f32(builder, out, builder.add(out_off, _c(4 * r)), reduce_add_f32(builder, builder.load(acc[k][r]), 16))


def _make_float(n_tokens: int):
    @intrinsic
    def float_tile(typingctx, w, w_off, xf, t0, nb, out, out_off, path):
        sig = types.void(w, types.intp, xf, types.intp, types.intp, out, types.intp, types.intp)
        fmt = _format(w)

        def codegen(context, builder, signature, args):
            wa, w_off_v, _, t0_v, nb_v, _, out_off_v, path_v = args
            wp = byte_ptr(context, builder, signature.args[0], wa)
            tokens = token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 5))
            out_bytes = builder.mul(out_off_v, ir.Constant(out_off_v.type, 4))
            by_f16c(builder, path_v, lambda f16c: _float_body(builder, fmt, wp, w_off_v, tokens, nb_v, out_bytes, f16c))
            return context.get_dummy_value()

        return sig, codegen

    return float_tile


# grouped_f32_tileN(w, w_off, xf, t0, nb, out, out_off, path): as int8_tileN for float32
# activations xf [T, blocks * 32] (the exact product, slower than the int8 one). Tiles of 2:
# 2 tokens x 4 rows of 16-lane sums take 8 of AVX-512's 32 registers (16 of AVX2's 16 ymm; a few
# reloads there are cheaper than a weight block dequantized per token).
F32_TOKEN_TILE = 2
grouped_f32_tile1 = _make_float(1)
grouped_f32_tile2 = _make_float(F32_TOKEN_TILE)


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the int32 ``bits`` (a bitcast, for building 2^n)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F32)

    return sig, codegen
