"""LLVM IR building blocks for the vector kernels (``simd``, ``simd_float``),
written through numba's ``@intrinsic``: loads, splats, reductions, prefetches, float16
conversion, and the choice of a body per SIMD path.

The kernels take an integer ``path`` argument:

- ``PATH_AVX512``: 512-bit vectors with ``vpdpbusd`` (AVX512-VNNI);
- ``PATH_VNNI``: ``vpdpbusd`` on 256-bit vectors (AVX-VNNI or AVX512-VNNI);
- ``PATH_AVX2``: ``pmaddubsw``/``pmaddwd`` int8 dot products (needs AVX2, FMA and F16C);
- ``PATH_DOTPROD``: AArch64 ``sdot`` int8 dot products (the DotProd extension: Raspberry Pi
  5's Cortex-A76, every Apple M chip);
- ``PATH_NEON``: AArch64 without it (Raspberry Pi 4's Cortex-A72): ``smull`` products widened
  pairwise into the same lanes;
- ``PATH_PORTABLE``: target-independent LLVM vector IR, which LLVM lowers for any CPU
  (SSE on old x86, plain NEON on ARM).

Every body is compiled into every kernel, but where the CPU lacks an instruction set its body
is replaced by the portable one at compile time (``by_path``), so no x86 instruction ever
reaches an ARM code generator, nor ``sdot`` one for a target without it (LLVM aborts the
process there). The path is a run-time argument rather than a compile-time
switch so that the on-disk kernel cache holds one binary that serves all paths (the tests force
each one).
"""
from __future__ import annotations

from typing import Callable

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features

from dllama.kernels.numba_config import HOST_IS_ARM64, cpu_has_dotprod

PATH_PORTABLE = 0
PATH_AVX2 = 1
PATH_VNNI = 2
PATH_AVX512 = 3
PATH_NEON = 4
PATH_DOTPROD = 5

try:
    _features = llvm_binding.get_host_cpu_features()
except RuntimeError:  # a CPU LLVM cannot read (an emulated one): no x86 extension, surely
    _features = {}
HOST_HAS_AVX2 = all(_features.get(f, False) for f in ("avx2", "fma", "f16c"))
# vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX512-VNNI with AVX512-VL.
HOST_HAS_VNNI = HOST_HAS_AVX2 and (_features.get("avxvnni", False) or
                                   (_features.get("avx512vnni", False) and _features.get("avx512vl", False)))
# vpdpbusd on 512-bit vectors: one instruction covers all four rows of a group.
HOST_HAS_AVX512 = HOST_HAS_VNNI and all(_features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))
# AdvSIMD (NEON) is part of every AArch64 CPU. sdot needs the CPU to run it and numba's target
# to have it (numba_config adds it to the target when the CPU has it and LLVM did not see it).
HOST_HAS_NEON = HOST_IS_ARM64
HOST_HAS_DOTPROD = (HOST_IS_ARM64 and cpu_has_dotprod()
                    and "+dotprod" in (config.CPU_FEATURES or get_host_cpu_features()).split(","))
# float16 -> float32 in one instruction: F16C's vcvtph2ps, AArch64's fcvtl (always there).
HOST_HAS_HALF_CONVERSION = HOST_HAS_AVX2 or HOST_IS_ARM64

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
HALF = ir.HalfType()


def vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def splat(builder: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    vt = vec(value.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def load(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, ty: ir.Type) -> ir.Value:
    """Unaligned load of ``ty`` at ``base + byte_offset`` (base is an i8*)."""
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def byte_ptr(context, builder, array_type, array_value) -> ir.Value:
    ary = context.make_array(array_type)(context, builder, array_value)
    return builder.bitcast(ary.data, I8.as_pointer())


def intrinsic_fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def reduce_add_f32(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """Sum of the lanes by halving (a fixed order: the result does not depend on the target)."""
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(I32, 0))


def prefetch(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, locality: int = 3) -> None:
    """A read hint: harmless past the end of the array (prefetches never fault). ``locality`` 3
    fetches into every cache level (prefetcht0), 2 stops at L2 (prefetcht1)."""
    pf = intrinsic_fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
    builder.call(pf, [builder.gep(base, [byte_offset]), ir.Constant(I32, 0), ir.Constant(I32, locality),
                      ir.Constant(I32, 1)])


def half_to_float(builder: ir.IRBuilder, bits: ir.Value, n: int, hardware: bool) -> ir.Value:
    """``n`` float16 bit patterns (<n x i16>) to <n x float>, exactly."""
    if hardware:  # F16C's vcvtph2ps, AArch64's fcvtl
        return builder.fpext(builder.bitcast(bits, vec(HALF, n)), vec(F32, n))
    # Without a hardware conversion: place the bits in a float32 and rescale by 2^112, which is
    # exact for normal and subnormal halves; exponent 31 (inf/nan) is mapped by hand.
    u = builder.zext(bits, vec(I32, n))
    sign = builder.shl(builder.and_(u, ir.Constant(vec(I32, n), [0x8000] * n)), ir.Constant(vec(I32, n), [16] * n))
    mag = builder.and_(u, ir.Constant(vec(I32, n), [0x7FFF] * n))
    shifted = builder.shl(mag, ir.Constant(vec(I32, n), [13] * n))
    scaled = builder.fmul(builder.bitcast(shifted, vec(F32, n)),
                          ir.Constant(vec(F32, n), [float(2.0 ** 112)] * n))
    scaled_bits = builder.bitcast(scaled, vec(I32, n))
    special = builder.icmp_unsigned(">=", mag, ir.Constant(vec(I32, n), [0x7C00] * n))
    inf_nan = builder.or_(shifted, ir.Constant(vec(I32, n), [0x7F800000] * n))
    out = builder.or_(builder.select(special, inf_nan, scaled_bits), sign)
    return builder.bitcast(out, vec(F32, n))


def row_ptr(context, builder, array_type, array_value, row) -> ir.Value:
    """Byte pointer to row ``row`` of a 2-D array."""
    ary = context.make_array(array_type)(context, builder, array_value)
    stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
    return builder.gep(builder.bitcast(ary.data, I8.as_pointer()), [builder.mul(row, stride)])


def token_rows(context, builder, signature, args, t0, n_tokens: int, arrays: tuple[int, ...]) -> list[tuple]:
    """Per token t0 .. t0 + n_tokens - 1, byte pointers to its row of each 2-D array argument."""
    rows = []
    for k in range(n_tokens):
        t = builder.add(t0, ir.Constant(t0.type, k))
        rows.append(tuple(row_ptr(context, builder, signature.args[i], args[i], t) for i in arrays))
    return rows


def store_f32(builder: ir.IRBuilder, out: ir.Value, byte_offset: ir.Value, value: ir.Value) -> None:
    builder.store(value, builder.bitcast(builder.gep(out, [byte_offset]), F32.as_pointer()))


def by_path(builder: ir.IRBuilder, path: ir.Value, emit: Callable[[str], None], name: str) -> None:
    """Emit ``emit(kind)`` once per kind of body and branch to it on the run-time ``path`` value;
    ``kind`` is "avx512", "vnni", "avx2", "dotprod", "neon" or "portable", downgraded to what this
    CPU can run. Paths downgraded to the same kind share one body (numba compiles each once)."""
    vnni = "vnni" if HOST_HAS_VNNI else ("avx2" if HOST_HAS_AVX2 else "portable")
    neon = "neon" if HOST_HAS_NEON else "portable"
    kinds = {PATH_AVX512: "avx512" if HOST_HAS_AVX512 else vnni,
             PATH_VNNI: vnni,
             PATH_AVX2: "avx2" if HOST_HAS_AVX2 else "portable",
             PATH_DOTPROD: "dotprod" if HOST_HAS_DOTPROD else neon,
             PATH_NEON: neon}
    bodies = {"portable": builder.append_basic_block(f"{name}_portable")}
    switch = builder.switch(path, bodies["portable"])  # any other value: the portable body
    for path_id, kind in kinds.items():
        if kind not in bodies:
            bodies[kind] = builder.append_basic_block(f"{name}_{kind}")
        switch.add_case(ir.Constant(path.type, path_id), bodies[kind])
    done = builder.append_basic_block(f"{name}_done")
    for kind, block in bodies.items():
        builder.position_at_end(block)
        emit(kind)
        builder.branch(done)
    builder.position_at_end(done)


def by_f16c(builder: ir.IRBuilder, path: ir.Value, emit: Callable[[bool], None]) -> None:
    """For float kernels, where the paths differ only in how float16 becomes float32: emit
    ``emit(True)`` (one instruction) for the other paths of a CPU that has it, ``emit(False)``
    for the portable path and elsewhere."""
    portable = builder.icmp_signed("==", path, ir.Constant(path.type, PATH_PORTABLE))
    with builder.if_else(portable) as (then, otherwise):
        with then:
            emit(False)
        with otherwise:
            emit(HOST_HAS_HALF_CONVERSION)
