"""LLVM vector code for the hot loops, written through numba's ``@intrinsic``.

numba's own loops over Q40 nibbles reach a tenth of the memory bandwidth; these intrinsics emit
the vector instructions directly. Each has several bodies, picked per call by an integer
``path`` argument:

- ``PATH_AVX512``: ``vpdpbusd`` on 512-bit vectors (AVX512-VNNI);
- ``PATH_VNNI``: ``vpdpbusd`` on 256-bit vectors (AVX-VNNI or AVX512-VNNI);
- ``PATH_AVX2``: ``pmaddubsw``/``pmaddwd`` int8 dot products (needs AVX2, FMA and F16C);
- ``PATH_PORTABLE``: target-independent LLVM vector IR, which LLVM lowers for any CPU
  (NEON on ARM, SSE on old x86).

Every body is compiled into every kernel, but where the CPU lacks an instruction set its body
is replaced by the next portable one at compile time, so no x86 instruction ever reaches an
ARM code generator. The path is a run-time argument rather than a compile-time switch so that
the on-disk kernel cache holds one binary that serves all paths (the tests force each one).

Packed Q40 weights (``packing.pack_q40``) hold ``GROUP_ROWS`` rows interleaved block by block:
one record per (row group, block) of ``GROUP_ROWS`` float16 scales followed by
``GROUP_ROWS`` x 16 nibble bytes, so a row group streams through memory as one run.
"""
from __future__ import annotations

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PATH_PORTABLE = 0
PATH_AVX2 = 1
PATH_VNNI = 2
PATH_AVX512 = 3

GROUP_ROWS = 4
# Bytes ahead of the current record to prefetch. Measured on the project's 2-core machine
# (memory bandwidth 16 GB/s on one thread, 26-30 on two), streaming 453 MB of Q40 weights on
# two threads: 256 -> 17.6 GB/s, 1024 -> 19.3, 2048 -> 21.2, 4096-8192 -> 28-31, 12288 -> 25.
PREFETCH = 6144
Q40_RECORD = GROUP_ROWS * 2 + GROUP_ROWS * 16  # bytes per (row group, block)
Q80_CORR_LANES = 8  # int32 lanes of the per-block activation correction (see q40_q80_group)
# A Q80 activation block as the int8 products read it: values 0-15 twice, then 16-31 twice.
Q80_ACT_BYTES = 64

_features = llvm_binding.get_host_cpu_features()
HOST_HAS_AVX2 = all(_features.get(f, False) for f in ("avx2", "fma", "f16c"))
# vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX512-VNNI with AVX512-VL.
HOST_HAS_VNNI = HOST_HAS_AVX2 and (_features.get("avxvnni", False) or
                                   (_features.get("avx512vnni", False) and _features.get("avx512vl", False)))
# vpdpbusd on 512-bit vectors: one instruction covers all four rows of a group.
HOST_HAS_AVX512 = HOST_HAS_VNNI and all(_features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_half = ir.HalfType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(builder: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    vt = _vec(value.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(_i32, n), [0] * n))


def _load(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, ty: ir.Type) -> ir.Value:
    """Unaligned load of ``ty`` at ``base + byte_offset`` (base is an i8*)."""
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _byte_ptr(context, builder, array_type, array_value) -> ir.Value:
    ary = context.make_array(array_type)(context, builder, array_value)
    return builder.bitcast(ary.data, _i8.as_pointer())


def _intrinsic_fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _reduce_add_f32(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """Sum of the lanes by halving (a fixed order: the result does not depend on the target)."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _prefetch(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value) -> None:
    """A read hint: harmless past the end of the array (prefetches never fault)."""
    pf = _intrinsic_fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    builder.call(pf, [builder.gep(base, [byte_offset]), ir.Constant(_i32, 0), ir.Constant(_i32, 3),
                      ir.Constant(_i32, 1)])


def _nibbles(builder: ir.IRBuilder, q16: ir.Value) -> ir.Value:
    """16 bytes of a Q40 block to its 32 unsigned nibbles in value order (lows then highs)."""
    mask = ir.Constant(_vec(_i8, 16), [0x0F] * 16)
    lo = builder.and_(q16, mask)
    hi = builder.lshr(q16, ir.Constant(_vec(_i8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 32), list(range(32))))


def _half_to_float(builder: ir.IRBuilder, bits: ir.Value, n: int, avx2: bool) -> ir.Value:
    """``n`` float16 bit patterns (<n x i16>) to <n x float>, exactly."""
    if avx2:  # F16C: vcvtph2ps
        return builder.fpext(builder.bitcast(bits, _vec(_half, n)), _vec(_f32, n))
    # Without a hardware conversion: place the bits in a float32 and rescale by 2^112, which is
    # exact for normal and subnormal halves; exponent 31 (inf/nan) is mapped by hand.
    u = builder.zext(bits, _vec(_i32, n))
    sign = builder.shl(builder.and_(u, ir.Constant(_vec(_i32, n), [0x8000] * n)), ir.Constant(_vec(_i32, n), [16] * n))
    mag = builder.and_(u, ir.Constant(_vec(_i32, n), [0x7FFF] * n))
    shifted = builder.shl(mag, ir.Constant(_vec(_i32, n), [13] * n))
    scaled = builder.fmul(builder.bitcast(shifted, _vec(_f32, n)),
                          ir.Constant(_vec(_f32, n), [float(2.0 ** 112)] * n))
    scaled_bits = builder.bitcast(scaled, _vec(_i32, n))
    special = builder.icmp_unsigned(">=", mag, ir.Constant(_vec(_i32, n), [0x7C00] * n))
    inf_nan = builder.or_(shifted, ir.Constant(_vec(_i32, n), [0x7F800000] * n))
    out = builder.or_(builder.select(special, inf_nan, scaled_bits), sign)
    return builder.bitcast(out, _vec(_f32, n))


def _q40_q80_body(builder, w, w_off, tokens, nb, out_off, kind: str) -> None:
    """Dot products of the GROUP_ROWS rows of one packed group with each token's Q80 activation.

    ``tokens`` holds (xq, xd, xcorr, out) byte pointers per token; ``out_off`` is in bytes.
    Each weight block is loaded and split into nibbles once for all the tokens, so prefill
    reads a weight once per tile of tokens.
    """
    g = GROUP_ROWS
    i64 = ir.IntType(64)
    if kind == "portable":
        for tok in tokens:
            _q40_q80_portable(builder, w, w_off, tok, nb, out_off)
        return
    if kind == "avx512":
        _q40_q80_avx512(builder, w, w_off, tokens, nb, out_off)
        return
    # Two rows at once: 32 bytes of nibbles hold the low halves of rows r and r+1 side by side,
    # and the activation is stored twice in the matching order, so one int8 product serves two
    # rows; lanes 0-3 of an accumulator sum row r, lanes 4-7 row r+1.
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(_vec(_f32, 8), [0.0] * 8)) for _ in range(g // 2)]
           for _ in tokens]
    v8i32 = _vec(_i32, 8)
    if kind == "vnni":  # u8 x s8 products summed into int32 lanes in one instruction
        dpbusd = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.256", v8i32, [v8i32] * 3)
    else:
        maddubs = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [_vec(_i8, 32)] * 2)
        maddwd = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [_vec(_i16, 16)] * 2)
        ones16 = ir.Constant(_vec(_i16, 16), [1] * 16)
    mask = ir.Constant(_vec(_i8, 32), [0x0F] * 32)
    four = ir.Constant(_vec(_i8, 32), [4] * 32)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec = builder.add(w_off, builder.mul(b, ir.Constant(i64, Q40_RECORD)))
        _prefetch(builder, w, builder.add(rec, ir.Constant(i64, PREFETCH)))
        dw = _half_to_float(builder, _load(builder, w, rec, _vec(_i16, g)), g, True)
        # Each pair's two scales spread over its accumulator's lanes, once for all tokens.
        dw_pairs = [builder.shuffle_vector(dw, dw, ir.Constant(_vec(_i32, 8), [2 * p] * 4 + [2 * p + 1] * 4))
                    for p in range(g // 2)]
        nibbles = []
        for p in range(g // 2):
            q = _load(builder, w, builder.add(rec, ir.Constant(i64, 2 * g + 32 * p)), _vec(_i8, 32))
            nibbles.append((builder.and_(q, mask), builder.and_(builder.lshr(q, four), mask)))
        xb = builder.mul(b, ir.Constant(i64, Q80_ACT_BYTES))
        for k, (xq, xd, xcorr, _) in enumerate(tokens):
            x_lo = _load(builder, xq, xb, _vec(_i8, 32))
            x_hi = _load(builder, xq, builder.add(xb, ir.Constant(i64, 32)), _vec(_i8, 32))
            corr = _load(builder, xcorr, builder.mul(b, ir.Constant(i64, 4 * Q80_CORR_LANES)), v8i32)
            dx = _splat(builder, _load(builder, xd, builder.mul(b, ir.Constant(i64, 4)), _f32), 8)
            if kind == "vnni":
                x_lo32, x_hi32 = builder.bitcast(x_lo, v8i32), builder.bitcast(x_hi, v8i32)
            for p, (lo, hi) in enumerate(nibbles):
                if kind == "vnni":
                    p32 = builder.call(dpbusd, [corr, builder.bitcast(lo, v8i32), x_lo32])
                    p32 = builder.call(dpbusd, [p32, builder.bitcast(hi, v8i32), x_hi32])
                else:
                    p16 = builder.add(builder.call(maddubs, [lo, x_lo]), builder.call(maddubs, [hi, x_hi]))
                    p32 = builder.add(builder.call(maddwd, [p16, ones16]), corr)
                f = builder.sitofp(p32, _vec(_f32, 8))
                s = builder.fmul(dw_pairs[p], dx)
                cur = builder.load(acc[k][p])
                builder.store(builder.fadd(cur, builder.fmul(f, s, flags=["contract"]), flags=["contract"]), acc[k][p])
    for k, tok in enumerate(tokens):
        out = tok[3]
        for r in range(g):
            v = builder.load(acc[k][r // 2])
            half = 4 * (r % 2)
            quarter = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, 4), list(range(half, half + 4))))
            _store_f32(builder, out, builder.add(out_off, ir.Constant(i64, 4 * r)), _reduce_add_f32(builder, quarter, 4))


def _q40_q80_avx512(builder, w, w_off, tokens, nb, out_off) -> None:
    """The 512-bit form: the group's 64 nibble bytes (4 rows) in one register; the activation's
    32-byte halves are broadcast to all four 128-bit lanes, so lanes 4r..4r+3 sum row r."""
    g = GROUP_ROWS
    i64 = ir.IntType(64)
    v16i32 = _vec(_i32, 16)
    acc = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_f32, 16), [0.0] * 16)) for _ in tokens]
    dpbusd = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32] * 3)
    mask = ir.Constant(_vec(_i8, 64), [0x0F] * 64)
    four = ir.Constant(_vec(_i8, 64), [4] * 64)
    twice = ir.Constant(_vec(_i32, 64), list(range(32)) * 2)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec = builder.add(w_off, builder.mul(b, ir.Constant(i64, Q40_RECORD)))
        _prefetch(builder, w, builder.add(rec, ir.Constant(i64, PREFETCH)))
        dw = _half_to_float(builder, _load(builder, w, rec, _vec(_i16, g)), g, True)
        dw16 = builder.shuffle_vector(dw, dw, ir.Constant(_vec(_i32, 16), [r for r in range(g) for _ in range(4)]))
        q = _load(builder, w, builder.add(rec, ir.Constant(i64, 2 * g)), _vec(_i8, 64))
        lo = builder.bitcast(builder.and_(q, mask), v16i32)
        hi = builder.bitcast(builder.and_(builder.lshr(q, four), mask), v16i32)
        xb = builder.mul(b, ir.Constant(i64, Q80_ACT_BYTES))
        for k, (xq, xd, xcorr, _) in enumerate(tokens):
            x_lo = _load(builder, xq, xb, _vec(_i8, 32))
            x_hi = _load(builder, xq, builder.add(xb, ir.Constant(i64, 32)), _vec(_i8, 32))
            x_lo = builder.bitcast(builder.shuffle_vector(x_lo, x_lo, twice), v16i32)
            x_hi = builder.bitcast(builder.shuffle_vector(x_hi, x_hi, twice), v16i32)
            corr = _load(builder, xcorr, builder.mul(b, ir.Constant(i64, 4 * Q80_CORR_LANES)), _vec(_i32, 8))
            corr = builder.shuffle_vector(corr, corr, ir.Constant(_vec(_i32, 16), list(range(8)) * 2))
            dx = _splat(builder, _load(builder, xd, builder.mul(b, ir.Constant(i64, 4)), _f32), 16)
            p32 = builder.call(dpbusd, [builder.call(dpbusd, [corr, lo, x_lo]), hi, x_hi])
            f = builder.sitofp(p32, _vec(_f32, 16))
            cur = builder.load(acc[k])
            scaled = builder.fmul(f, builder.fmul(dw16, dx), flags=["contract"])
            builder.store(builder.fadd(cur, scaled, flags=["contract"]), acc[k])
    for k, tok in enumerate(tokens):
        v = builder.load(acc[k])
        for r in range(g):
            quarter = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, 4), list(range(4 * r, 4 * r + 4))))
            _store_f32(builder, tok[3], builder.add(out_off, ir.Constant(i64, 4 * r)),
                       _reduce_add_f32(builder, quarter, 4))


def _q40_q80_portable(builder, w, w_off, tok, nb, out_off) -> None:
    g = GROUP_ROWS
    i64 = ir.IntType(64)
    xq, xd, xcorr, out = tok
    acc4 = cgutils.alloca_once_value(builder, ir.Constant(_vec(_f32, g), [0.0] * g))
    red = _intrinsic_fn(builder, "llvm.vector.reduce.add.v32i32", _i32, [_vec(_i32, 32)])
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec = builder.add(w_off, builder.mul(b, ir.Constant(i64, Q40_RECORD)))
        _prefetch(builder, w, builder.add(rec, ir.Constant(i64, PREFETCH)))
        xb = builder.mul(b, ir.Constant(i64, Q80_ACT_BYTES))
        dx = _load(builder, xd, builder.mul(b, ir.Constant(i64, 4)), _f32)
        dws = builder.fmul(_half_to_float(builder, _load(builder, w, rec, _vec(_i16, g)), g, False),
                           _splat(builder, dx, g))
        x = builder.shuffle_vector(_load(builder, xq, xb, _vec(_i8, 16)),
                                   _load(builder, xq, builder.add(xb, ir.Constant(i64, 32)), _vec(_i8, 16)),
                                   ir.Constant(_vec(_i32, 32), list(range(32))))
        xs = builder.sext(x, _vec(_i16, 32))
        corr = _load(builder, xcorr, builder.mul(b, ir.Constant(i64, 4 * Q80_CORR_LANES)), _i32)
        sums = ir.Constant(_vec(_i32, g), ir.Undefined)
        for r in range(g):
            q16 = _load(builder, w, builder.add(rec, ir.Constant(i64, 2 * g + 16 * r)), _vec(_i8, 16))
            prod = builder.mul(builder.zext(_nibbles(builder, q16), _vec(_i16, 32)), xs)  # |15 * 127| fits
            total = builder.add(builder.call(red, [builder.sext(prod, _vec(_i32, 32))]), corr)
            sums = builder.insert_element(sums, total, ir.Constant(_i32, r))
        cur = builder.load(acc4)
        f = builder.sitofp(sums, _vec(_f32, g))
        builder.store(builder.fadd(cur, builder.fmul(f, dws, flags=["contract"]), flags=["contract"]), acc4)
    for r in range(g):
        _store_f32(builder, out, builder.add(out_off, ir.Constant(i64, 4 * r)),
                   builder.extract_element(builder.load(acc4), ir.Constant(_i32, r)))


def _row_ptr(context, builder, array_type, array_value, row) -> ir.Value:
    """Byte pointer to row ``row`` of a 2-D array."""
    ary = context.make_array(array_type)(context, builder, array_value)
    stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
    return builder.gep(builder.bitcast(ary.data, _i8.as_pointer()), [builder.mul(row, stride)])


def _token_rows(context, builder, signature, args, t0, n_tokens: int, arrays: tuple[int, ...]) -> list[tuple]:
    """Per token t0 .. t0 + n_tokens - 1, byte pointers to its row of each 2-D array argument."""
    rows = []
    for k in range(n_tokens):
        t = builder.add(t0, ir.Constant(t0.type, k))
        rows.append(tuple(_row_ptr(context, builder, signature.args[i], args[i], t) for i in arrays))
    return rows


def _store_f32(builder: ir.IRBuilder, out: ir.Value, byte_offset: ir.Value, value: ir.Value) -> None:
    builder.store(value, builder.bitcast(builder.gep(out, [byte_offset]), _f32.as_pointer()))


def _make_q40_q80(n_tokens: int):
    @intrinsic
    def q40_q80_tile(typingctx, w, w_off, xq, xd, xcorr, t0, nb, out, out_off, path):
        sig = types.void(w, types.intp, xq, xd, xcorr, types.intp, types.intp, out, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            wa, w_off_v, _, _, _, t0_v, nb_v, _, out_off_v, path_v = args
            wp = _byte_ptr(context, builder, signature.args[0], wa)
            tokens = _token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 3, 4, 7))
            out_bytes = builder.mul(out_off_v, ir.Constant(out_off_v.type, 4))
            # Where the CPU lacks an instruction set, its path gets the next best body.
            fallback = "vnni" if HOST_HAS_VNNI else ("avx2" if HOST_HAS_AVX2 else "portable")
            bodies = [(PATH_AVX512, "avx512" if HOST_HAS_AVX512 else fallback),
                      (PATH_VNNI, fallback),
                      (PATH_AVX2, "avx2" if HOST_HAS_AVX2 else "portable")]
            done = builder.append_basic_block("q40_done")
            for path_id, kind in bodies:
                hit = builder.icmp_signed("==", path_v, ir.Constant(path_v.type, path_id))
                then = builder.append_basic_block(f"q40_path{path_id}")
                other = builder.append_basic_block(f"q40_not{path_id}")
                builder.cbranch(hit, then, other)
                builder.position_at_end(then)
                _q40_q80_body(builder, wp, w_off_v, tokens, nb_v, out_bytes, kind)
                builder.branch(done)
                builder.position_at_end(other)
            _q40_q80_body(builder, wp, w_off_v, tokens, nb_v, out_bytes, "portable")
            builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return q40_q80_tile


# Tokens multiplied per pass over a weight group in prefill: 4 tokens x 2 row pairs keep 8
# accumulators, half the 16 vector registers of AVX2; AVX-512 (32 registers, one accumulator
# per token) takes tiles of 8 (measured 12 % faster than 4).
TOKEN_TILE = 4
# q40_q80_tileN(w, w_off, xq, xd, xcorr, t0, nb, out, out_off, path):
#   out[t0 + k, out_off + r] = dot(row r of the packed group at w[w_off:], activation of token
#   t0 + k) for r < GROUP_ROWS, k < N. The activation is Q80 (see Q80_ACT_BYTES): xq int8
#   [T, blocks * 64], xd float32 block scales [T, blocks], xcorr int32 [T, blocks * 8] with
#   -8 * sum(block values) in lanes 0 and 4: the int8 products need unsigned nibbles, so the
#   kernel sums nibble * x and adds the -8 * sum(x) that the nibbles' offset of 8 takes away.
q40_q80_tile1 = _make_q40_q80(1)
q40_q80_tile4 = _make_q40_q80(TOKEN_TILE)
q40_q80_tile8 = _make_q40_q80(8)


def _q40_f32_body(builder, w, w_off, tokens, nb, out_off, f16c: bool) -> None:
    """Dot products of a packed group's rows with float32 activations. Each row's 32 weights of a
    block are dequantized once for all the tokens of the tile, to the same float32 values the
    reference multiplies by ((nibble - 8) * scale, exact). Plain vector IR, lowered by LLVM for
    whatever the CPU has (512, 256 or 128-bit registers)."""
    g = GROUP_ROWS
    i64 = ir.IntType(64)
    acc = [[cgutils.alloca_once_value(builder, ir.Constant(_vec(_f32, 16), [0.0] * 16)) for _ in range(g)]
           for _ in tokens]
    eight = ir.Constant(_vec(_i8, 16 * g), [8] * (16 * g))
    mask = ir.Constant(_vec(_i8, 16 * g), [0x0F] * (16 * g))
    four = ir.Constant(_vec(_i8, 16 * g), [4] * (16 * g))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        rec = builder.add(w_off, builder.mul(b, ir.Constant(i64, Q40_RECORD)))
        _prefetch(builder, w, builder.add(rec, ir.Constant(i64, PREFETCH)))
        dw = _half_to_float(builder, _load(builder, w, rec, _vec(_i16, g)), g, f16c)
        q = _load(builder, w, builder.add(rec, ir.Constant(i64, 2 * g)), _vec(_i8, 16 * g))
        lo = builder.sub(builder.and_(q, mask), eight)  # signed values 0-15 of each row
        hi = builder.sub(builder.and_(builder.lshr(q, four), mask), eight)  # values 16-31
        xs = []
        for xf, _ in tokens:
            x = _load(builder, xf, builder.mul(b, ir.Constant(i64, 128)), _vec(_f32, 32))
            xs.append([builder.shuffle_vector(x, x, ir.Constant(_vec(_i32, 16), list(range(16 * h, 16 * h + 16))))
                       for h in range(2)])
        for r in range(g):
            low_half = builder.shuffle_vector(lo, lo, ir.Constant(_vec(_i32, 16), list(range(16 * r, 16 * r + 16))))
            high_half = builder.shuffle_vector(hi, hi, ir.Constant(_vec(_i32, 16), list(range(16 * r, 16 * r + 16))))
            d = _splat(builder, builder.extract_element(dw, ir.Constant(_i32, r)), 16)
            wd = [builder.fmul(builder.sitofp(half, _vec(_f32, 16)), d) for half in (low_half, high_half)]
            for k, x in enumerate(xs):
                cur = builder.load(acc[k][r])
                for h in range(2):
                    cur = builder.fadd(cur, builder.fmul(wd[h], x[h], flags=["contract"]), flags=["contract"])
                builder.store(cur, acc[k][r])
    for k, (_, out) in enumerate(tokens):
        for r in range(g):
            _store_f32(builder, out, builder.add(out_off, ir.Constant(i64, 4 * r)),
                       _reduce_add_f32(builder, builder.load(acc[k][r]), 16))


def _make_q40_f32(n_tokens: int):
    @intrinsic
    def q40_f32_tile(typingctx, w, w_off, xf, t0, nb, out, out_off, path):
        sig = types.void(w, types.intp, xf, types.intp, types.intp, out, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            wa, w_off_v, _, t0_v, nb_v, _, out_off_v, path_v = args
            wp = _byte_ptr(context, builder, signature.args[0], wa)
            tokens = _token_rows(context, builder, signature, args, t0_v, n_tokens, (2, 5))
            out_bytes = builder.mul(out_off_v, ir.Constant(out_off_v.type, 4))
            portable = builder.icmp_signed("==", path_v, ir.Constant(path_v.type, PATH_PORTABLE))
            with builder.if_else(portable) as (then, otherwise):
                with then:
                    _q40_f32_body(builder, wp, w_off_v, tokens, nb_v, out_bytes, False)
                with otherwise:
                    _q40_f32_body(builder, wp, w_off_v, tokens, nb_v, out_bytes, HOST_HAS_AVX2)
            return context.get_dummy_value()

        return sig, codegen

    return q40_f32_tile


# q40_f32_tileN(w, w_off, xf, t0, nb, out, out_off, path): as q40_q80_tileN for float32
# activations xf [T, blocks * 32] (the exact product, slower than the int8 one). Tiles of 2:
# 2 tokens x 4 rows of 16-lane sums take 8 of AVX-512's 32 registers (16 of AVX2's 16 ymm; a few
# reloads there are cheaper than a weight block dequantized once per token).
F32_TOKEN_TILE = 2
q40_f32_tile1 = _make_q40_f32(1)
q40_f32_tile2 = _make_q40_f32(F32_TOKEN_TILE)


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the int32 ``bits`` (a bitcast, for building 2^n)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _f32)

    return sig, codegen
