"""Causal grouped-query attention of a batch of rows from several sequences (each in its own KV
cache slot, at its own position), in jitted code; ``reference.attention`` is its definition.

Work items are (tile, KV head): a tile is a run of consecutive rows of one slot at consecutive
positions (a prompt chunk; a decode row is a tile of its own), and an item attends all of the
tile's queries that read that KV head together, so each cache row is loaded once for up to
``TILE_ROWS x group`` queries. Keys go in blocks of ``KEYS`` at fixed positions (block b holds
positions b*KEYS ..), each block transposed into a [head_dim, KEYS] scratch, so that a step of
up to ``QUERIES`` queries computes its scores as fused multiply-adds over head_dim with the keys
along vector lanes, and its weighted values as multiply-adds over value rows; a running (online)
softmax, in base 2, carries each query's maximum, sum and weighted values from block to block.
The threads take whole items, shared out by their cost.

Batch invariance, bit for bit: a row's output does not depend on which other rows share its
batch, its tile or its step. Every query runs the same vector code (``_step``, LLVM IR without
reassociation, the same for each query of a step) over the same key blocks in the same order:
lanes past its own position become -inf before anything sums them (so their probabilities are
exact zeros), a block that starts past its position changes nothing (a factor 2^0 = 1 and zero
probabilities), and all that a tile adds to a query's sums are those zeros times the (finite)
values at the tile's own positions. Which rows make a tile, how many threads there are and how
many queries a step takes are free to change with the batch.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
# The thread count as numba's parallel code reads it (a call to the threading layer's symbol):
# numba.get_num_threads() holds a ctypes pointer, which keeps a function out of numba's cache.
from numba.np.ufunc.parallel import _iget_num_threads

from dllama.kernels.jit.vector_ir import F32, I8, I32, intrinsic_fn, splat, vec

LANES = 16  # floats per vector value of the IR (LLVM splits them where vectors are narrower)
KEYS = 32  # keys per block; blocks start at multiples of KEYS whatever the tile
# Queries per step, and runs of LANES columns of their weighted sums at a time: the accumulators
# stay in registers (32 vector registers with AVX-512, 16 with AVX2 and NEON).
_AVX512 = llvm_binding.get_host_cpu_features().get("avx512f", False)
QUERIES = 8 if _AVX512 else 4
PV_CHUNKS = 2 if _AVX512 else 1
# The query counts ``_step`` has a body for (each one's code costs compile time): a count that is
# not one of them runs as several steps.
STEP_SIZES = tuple(sorted({QUERIES, 4, 3, 2, 1}, reverse=True))
TILE_ROWS = 32  # rows per tile at most (fewer where the threads' shares would be uneven)

I64 = ir.IntType(64)
V = vec(F32, LANES)
VI = vec(I32, LANES)


def _const(value: float) -> ir.Constant:
    return ir.Constant(V, [value] * LANES)


def _fma(builder, a, b, c):
    """a * b + c, fused where the CPU has FMA (the same choice at every call)."""
    return builder.call(intrinsic_fn(builder, "llvm.fmuladd.v16f32", V, [V, V, V]), [a, b, c])


def _vmax(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def _halve(builder, v, combine, n=LANES):
    """Combine the lanes of ``v`` pairwise by halving: a fixed order, whatever the target."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n, 2 * n))))
        v = combine(builder, lo, hi)
    return builder.extract_element(v, ir.Constant(I32, 0))


def _vexp2(builder, x):
    """2^x per lane for x <= 0 (scores minus their running maximum), Cephes' exp2f: x = n + f
    with n an integer and |f| <= 1/2, 2^f = 1 + f P(f) (degree 5), n added to the exponent.
    Exactly 1 at 0; 0 below -125 (no subnormal probabilities: they would slow the products
    down, and are below 2^-125 of a sum that is at least 1); NaN stays NaN."""
    low = builder.fcmp_unordered("<", x, _const(-125.0))  # also NaN
    xc = builder.select(low, _const(0.0), x)
    rint = intrinsic_fn(builder, "llvm.rint.v16f32", V, [V])
    n = builder.call(rint, [xc])
    f = builder.fsub(xc, n)
    p = _const(1.535336188319500e-4)
    for coef in (1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2, 2.402264791363012e-1,
                 6.931472028550421e-1):
        p = _fma(builder, p, f, _const(coef))
    y = _fma(builder, f, p, _const(1.0))
    k = builder.shl(builder.fptosi(n, VI), ir.Constant(VI, [23] * LANES))
    out = builder.bitcast(builder.add(builder.bitcast(y, VI), k), V)
    out = builder.select(low, _const(0.0), out)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, out)


def _array(context, builder, ty, value):
    """Byte pointer to the data, and the strides and shape of an array argument."""
    a = context.make_array(ty)(context, builder, value)
    return (builder.bitcast(a.data, I8.as_pointer()), cgutils.unpack_tuple(builder, a.strides, ty.ndim),
            cgutils.unpack_tuple(builder, a.shape, ty.ndim))


def _ptr(builder, base, offset, ty):
    return builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())


def _emit_step(context, builder, signature, args, nq: int) -> None:
    """The body of ``_step`` for ``nq`` queries."""
    qs_v, q0, _, kt_v, vb_v, acc_v, st_v, qp_v, k0, scale = args
    qd, (qs0, _), (_, head_dim) = _array(context, builder, signature.args[0], qs_v)
    ktd, (kts0, _), _ = _array(context, builder, signature.args[3], kt_v)
    vd, (vs0, _), (nk, _) = _array(context, builder, signature.args[4], vb_v)
    ad, (as0, _), (_, padded) = _array(context, builder, signature.args[5], acc_v)
    sd, (ss0, _), _ = _array(context, builder, signature.args[6], st_v)
    pd, (ps0,), _ = _array(context, builder, signature.args[7], qp_v)
    c4 = ir.Constant(I64, 4)
    rows = [builder.add(q0, ir.Constant(I64, i)) for i in range(nq)]
    nv = KEYS // LANES

    # Scores: for each lane (key), the fused multiply-adds over d = 0 .. D-1 in order.
    sacc = [[cgutils.alloca_once_value(builder, _const(0.0)) for _ in range(nv)] for _ in range(nq)]
    for i in range(nq):
        for c in range(nv):
            builder.store(_const(0.0), sacc[i][c])
    qrow = [builder.gep(qd, [builder.mul(r, qs0)]) for r in rows]
    with cgutils.for_range(builder, head_dim) as loop:
        d = loop.index
        ktrow = builder.gep(ktd, [builder.mul(d, kts0)])
        keys = [builder.load(_ptr(builder, ktrow, ir.Constant(I64, 4 * LANES * c), V), align=4)
                for c in range(nv)]
        for i in range(nq):
            qv = splat(builder, builder.load(_ptr(builder, qrow[i], builder.mul(d, c4), F32)), LANES)
            for c in range(nv):
                builder.store(_fma(builder, qv, keys[c], builder.load(sacc[i][c])), sacc[i][c])

    # Online softmax: lanes past the query's position become -inf before anything sums.
    alloca_p = cgutils.alloca_once(builder, ir.ArrayType(F32, nq * KEYS))
    pbuf = builder.bitcast(alloca_p, I8.as_pointer())
    diffs = ir.Constant(V, [0.0] * LANES)
    m_new, l_old, probs = [], [], []
    for i in range(nq):
        pos = builder.load(_ptr(builder, pd, builder.mul(rows[i], ps0), I64))
        lim = builder.trunc(builder.sub(builder.add(pos, ir.Constant(I64, 1)), k0), I32)
        limv = splat(builder, lim, LANES)
        scores = []
        for c in range(nv):
            lane = ir.Constant(VI, list(range(c * LANES, (c + 1) * LANES)))
            s = builder.fmul(builder.load(sacc[i][c]), splat(builder, scale, LANES))
            scores.append(builder.select(builder.icmp_signed("<", lane, limv), s, _const(-math.inf)))
        top = scores[0]
        for s in scores[1:]:
            top = _vmax(builder, top, s)
        m_block = _halve(builder, top, _vmax)
        st_row = builder.gep(sd, [builder.mul(rows[i], ss0)])
        m_old = builder.load(_ptr(builder, st_row, ir.Constant(I64, 0), F32))
        l_old.append(builder.load(_ptr(builder, st_row, c4, F32)))
        m = builder.select(builder.fcmp_ordered(">", m_old, m_block), m_old, m_block)
        m_new.append(m)
        diffs = builder.insert_element(diffs, builder.fsub(m_old, m), ir.Constant(I32, i))
        probs.append([_vexp2(builder, builder.fsub(s, splat(builder, m, LANES))) for s in scores])
    alphas = _vexp2(builder, diffs)  # 2^(m_old - m_new): 0 at the first block, 1 if unchanged
    alpha = []
    for i in range(nq):
        a = builder.extract_element(alphas, ir.Constant(I32, i))
        alpha.append(a)
        total = probs[i][0]
        for p in probs[i][1:]:
            total = builder.fadd(total, p)
        psum = _halve(builder, total, lambda b, x, y: b.fadd(x, y))
        st_row = builder.gep(sd, [builder.mul(rows[i], ss0)])
        builder.store(m_new[i], _ptr(builder, st_row, ir.Constant(I64, 0), F32))
        builder.store(builder.fadd(builder.fmul(l_old[i], a), psum), _ptr(builder, st_row, c4, F32))
        for c, p in enumerate(probs[i]):
            builder.store(p, _ptr(builder, pbuf, ir.Constant(I64, 4 * (i * KEYS + c * LANES)), V), align=4)

    # Weighted values: acc = acc * alpha, then + p_j * v_j for the block's keys in order, over
    # PV_CHUNKS runs of LANES columns at a time (then one at a time for what is left).
    arow = [builder.gep(ad, [builder.mul(r, as0)]) for r in rows]
    chunks = builder.udiv(padded, ir.Constant(I64, LANES))

    def columns(c0, width):
        vacc = [[cgutils.alloca_once(builder, V) for _ in range(width)] for _ in range(nq)]
        offs = [builder.mul(builder.add(c0, ir.Constant(I64, w)), ir.Constant(I64, 4 * LANES)) for w in range(width)]
        for i in range(nq):
            for w in range(width):
                a = builder.load(_ptr(builder, arow[i], offs[w], V), align=4)
                builder.store(builder.fmul(a, splat(builder, alpha[i], LANES)), vacc[i][w])
        with cgutils.for_range(builder, nk) as keys:
            j = keys.index
            vrow = builder.gep(vd, [builder.mul(j, vs0)])
            vals = [builder.load(_ptr(builder, vrow, offs[w], V), align=4) for w in range(width)]
            for i in range(nq):
                at = builder.mul(builder.add(j, ir.Constant(I64, i * KEYS)), c4)
                pj = splat(builder, builder.load(_ptr(builder, pbuf, at, F32)), LANES)
                for w in range(width):
                    builder.store(_fma(builder, pj, vals[w], builder.load(vacc[i][w])), vacc[i][w])
        for i in range(nq):
            for w in range(width):
                builder.store(builder.load(vacc[i][w]), _ptr(builder, arow[i], offs[w], V), align=4)

    wide = builder.udiv(chunks, ir.Constant(I64, PV_CHUNKS))
    with cgutils.for_range(builder, wide) as loop:
        columns(builder.mul(loop.index, ir.Constant(I64, PV_CHUNKS)), PV_CHUNKS)
    if PV_CHUNKS > 1:
        done = builder.mul(wide, ir.Constant(I64, PV_CHUNKS))
        with cgutils.for_range(builder, builder.sub(chunks, done)) as loop:
            columns(builder.add(done, loop.index), 1)


@intrinsic
def _step(typingctx, qs, q0, n, kt, vb, acc, state, qpos, k0, scale):
    """Queries q0 .. q0 + n - 1 (n <= QUERIES; rows of ``qs`` [nq, D], at positions ``qpos``)
    against the key block at k0: ``kt`` [D, KEYS] holds its keys by column, ``vb`` [nk, >= Dp]
    its values' rows (nk: the keys of the block that the tile has; no other is read), ``acc``
    [nq, Dp] (Dp: D rounded up to LANES) the queries' weighted sums of values so far, ``state``
    [nq, 2] their running maximum score and softmax sum. One body per n, each the same code per
    query."""
    sig = types.void(qs, types.intp, types.intp, kt, vb, acc, state, qpos, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        n = args[2]
        done = builder.append_basic_block("step_done")
        switch = builder.switch(n, done)
        for nq in STEP_SIZES:
            body = builder.append_basic_block(f"step_{nq}")
            switch.add_case(ir.Constant(n.type, nq), body)
            builder.position_at_end(body)
            _emit_step(context, builder, signature, args, nq)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _transpose_squares(typingctx, rows, cols):
    """cols[d, j] = rows[j, d] over the whole 16 x 16 squares of ``rows`` [n, D] (strided rows):
    16 vector loads, 64 two-vector shuffles (four rounds of swapping off-diagonal blocks), 16
    stores. The caller copies what is left past the last whole square."""
    sig = types.void(rows, cols)

    def codegen(context, builder, signature, args):
        rd, (rs0, _), (n, head_dim) = _array(context, builder, signature.args[0], args[0])
        cd, (cs0, _), _ = _array(context, builder, signature.args[1], args[1])
        sixteen = ir.Constant(I64, LANES)
        with cgutils.for_range(builder, builder.udiv(n, sixteen)) as jl:
            j0 = builder.mul(jl.index, sixteen)
            with cgutils.for_range(builder, builder.udiv(head_dim, sixteen)) as dl:
                d0 = builder.mul(dl.index, sixteen)
                src = builder.gep(rd, [builder.add(builder.mul(j0, rs0), builder.mul(d0, ir.Constant(I64, 4)))])
                r = [builder.load(_ptr(builder, src, builder.mul(ir.Constant(I64, j), rs0), V), align=4)
                     for j in range(LANES)]
                b = LANES // 2
                while b >= 1:
                    for i in range(LANES):
                        if i & b:
                            continue
                        lo = [l if not l & b else LANES + l - b for l in range(LANES)]
                        hi = [l + b if not l & b else LANES + l for l in range(LANES)]
                        r[i], r[i + b] = (builder.shuffle_vector(r[i], r[i + b], ir.Constant(VI, lo)),
                                          builder.shuffle_vector(r[i], r[i + b], ir.Constant(VI, hi)))
                    b //= 2
                dst = builder.gep(cd, [builder.add(builder.mul(d0, cs0), builder.mul(j0, ir.Constant(I64, 4)))])
                for d in range(LANES):
                    builder.store(r[d], _ptr(builder, dst, builder.mul(ir.Constant(I64, d), cs0), V), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _tiles(slots, positions, tile_rows, starts):
    """Cut the rows into tiles of at most ``tile_rows`` consecutive rows of one slot at
    consecutive positions; ``starts`` gets each tile's first row and, after the last, the row
    count. Returns the number of tiles."""
    n_rows = slots.shape[0]
    n = 0
    t = 0
    while t < n_rows:
        end = t + 1
        while (end < n_rows and end - t < tile_rows and slots[end] == slots[t]
               and positions[end] == positions[end - 1] + 1):
            end += 1
        starts[n] = t
        n += 1
        t = end
    starts[n] = n_rows
    return n


@njit(cache=True, nogil=True)
def _attend_tile(q, k_cache, v_cache, slot, r0, r1, positions, kv, first, last, scale, heads_out,
                 qs, acc, state, qpos, kt, vpad):
    """Rows r0 .. r1 - 1 (one tile) of query heads first .. last - 1, which read KV head kv."""
    head_dim = q.shape[2]
    ng = last - first
    nq = (r1 - r0) * ng
    for t in range(r0, r1):
        for g in range(ng):
            i = (t - r0) * ng + g
            qpos[i] = positions[t]
            for d in range(head_dim):
                qs[i, d] = q[t, first + g, d]
            acc[i, :] = 0.0
            state[i, 0] = -np.inf
            state[i, 1] = 0.0
    top = positions[r1 - 1]  # the tile's last position (its rows' positions ascend)
    padded = acc.shape[1] != head_dim  # value rows that end inside a vector: copied, zero-padded
    whole_dims = head_dim // LANES * LANES
    for k0 in range(0, top + 1, KEYS):
        nk = min(KEYS, top + 1 - k0)  # the block's keys up to the tile's last position
        keys = k_cache[slot, k0:k0 + nk, kv]
        _transpose_squares(keys, kt)
        whole_keys = nk // LANES * LANES
        for j in range(nk):  # what the whole squares left
            for d in range(whole_dims if j < whole_keys else 0, head_dim):
                kt[d, j] = keys[j, d]
        if padded:
            for j in range(nk):
                for d in range(head_dim):
                    vpad[j, d] = v_cache[slot, k0 + j, kv, d]
            vb = vpad[:nk]
        else:
            vb = v_cache[slot, k0:k0 + nk, kv]
        q0 = 0
        while q0 < nq:
            n = 1
            for size in STEP_SIZES:  # the most that a step takes of those left
                if size <= nq - q0:
                    n = size
                    break
            if qpos[q0 + n - 1] >= k0:  # else the block is past every one of these queries
                _step(qs, q0, n, kt, vb, acc, state, qpos, k0, scale)
            q0 += n
    for i in range(nq):
        t = r0 + i // ng
        h = first + i % ng
        inv = np.float32(1.0) / state[i, 1]
        for d in range(head_dim):
            heads_out[t, h, d] = acc[i, d] * inv


@njit(cache=True, nogil=True)
def _share(starts, n_tiles, positions, n_kv, workers, owner):
    """Give the items (tile, KV head) = tile * n_kv + kv to the workers, the costliest first, each
    to the least loaded worker (``owner``); returns the most loaded worker's share of the work
    over an even share. An item's cost: its rows' keys, plus a block's worth per row."""
    n_items = n_tiles * n_kv
    cost = np.empty(n_items, dtype=np.float64)
    for tile in range(n_tiles):
        c = 0.0
        for t in range(starts[tile], starts[tile + 1]):
            c += positions[t] + 1 + KEYS
        for kv in range(n_kv):
            cost[tile * n_kv + kv] = c
    load = np.zeros(workers, dtype=np.float64)
    for item in np.argsort(-cost, kind="mergesort"):
        w = np.argmin(load)
        owner[item] = w
        load[w] += cost[item]
    return load.max() * workers / max(cost.sum(), 1.0)


@njit(cache=True, nogil=True, parallel=True)
def attention_into(q, k_cache, v_cache, slots, positions, out, group, head_offset):
    """Causal GQA of rows from several cache slots; q [T, heads, D], caches [slots, S, kv_heads, D]
    (C-contiguous), slots and positions [T], out [T, heads * D]. Row t attends positions
    0 .. positions[t] of slot slots[t]; query head h reads KV head (h + head_offset) // group, as
    in the reference."""
    n_rows, n_heads, head_dim = q.shape
    n_slots, seq_len, n_kv, _ = k_cache.shape
    if k_cache.strides[3] != 4 or v_cache.strides[3] != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("attention: the caches must be C-contiguous and of one shape")
    for t in range(n_rows):
        if not (0 <= slots[t] < n_slots and 0 <= positions[t] < seq_len):
            raise ValueError("attention: a row's slot or position is outside the cache")
    # Scores in base 2: q.k / sqrt(D) * log2(e), so that probabilities are powers of 2.
    scale = np.float32(1.0 / math.sqrt(head_dim) * 1.4426950408889634)
    threads = _iget_num_threads()
    starts = np.empty(n_rows + 1, dtype=np.int64)
    owner = np.empty(n_rows * n_kv, dtype=np.int64)
    tile_rows = TILE_ROWS
    # Smaller tiles while the threads' shares would be too uneven (tiles never change a row's
    # result, only how the work is shared; below 8 rows a key block serves too few queries).
    while True:
        n_tiles = _tiles(slots, positions, tile_rows, starts)
        workers = max(1, min(threads, n_tiles * n_kv))
        if _share(starts, n_tiles, positions, n_kv, workers, owner) < 1.2 or tile_rows <= 8:
            break
        tile_rows //= 2
    n_items = n_tiles * n_kv
    # Scratch per worker, allocated once per call.
    longest = 0
    for tile in range(n_tiles):
        longest = max(longest, starts[tile + 1] - starts[tile])
    max_q = longest * group
    padded = -(-head_dim // LANES) * LANES
    qs = np.empty((workers, max_q, head_dim), dtype=np.float32)
    acc = np.empty((workers, max_q, padded), dtype=np.float32)
    state = np.empty((workers, max_q, 2), dtype=np.float32)
    qpos = np.empty((workers, max_q), dtype=np.int64)
    kt = np.zeros((workers, head_dim, KEYS), dtype=np.float32)
    vpad = np.zeros((workers, KEYS, padded), dtype=np.float32)
    heads_out = out.reshape(n_rows, n_heads, head_dim)
    for w in prange(workers):
        for item in range(n_items):
            if owner[item] != w:
                continue
            tile = item // n_kv
            kv = item % n_kv
            first = max(0, kv * group - head_offset)
            last = min(n_heads, (kv + 1) * group - head_offset)
            if first < last:
                r0 = starts[tile]
                r1 = starts[tile + 1]
                _attend_tile(q, k_cache, v_cache, slots[r0], r0, r1, positions, kv, first, last, scale,
                             heads_out, qs[w], acc[w], state[w], qpos[w], kt[w], vpad[w])


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray, positions: np.ndarray,
              group: int = 0, head_offset: int = 0) -> np.ndarray:
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)
    group = group or q.shape[1] // k_cache.shape[2]
    attention_into(q, np.ascontiguousarray(k_cache, dtype=np.float32), np.ascontiguousarray(v_cache, dtype=np.float32),
                   np.ascontiguousarray(slots, dtype=np.int64), np.ascontiguousarray(positions, dtype=np.int64),
                   out, group, head_offset)
    return out
