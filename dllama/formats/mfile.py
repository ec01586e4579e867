"""distributed-llama model files (``.m``): header, tensor plan, memory-mapped reading, writing.

Layout: int32 magic ``0x0A00ABCD``; int32 header size ``H`` in bytes (counting the magic and
itself); ``(H - 8) / 8`` pairs of int32 ``(key, value)`` (see ``HeaderKey``); tensor data from
byte ``H`` on, in the order of ``tensor_plan``, with no padding. The file size must equal what
the header implies, to the byte.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path

import numpy as np

from dllama.errors import FormatError
from dllama.formats.atomic import open_temporary, publish
from dllama.kernels.backend import q40_quantizer
from dllama.kernels.quants import BLOCK_SIZE, FloatType, from_float32

MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)
# No real header comes near this; it stops a corrupt size from making us read the whole file.
MAX_HEADER_BYTES = 1 << 16


class HeaderKey(IntEnum):
    VERSION = 0
    ARCH_TYPE = 1
    DIM = 2
    HIDDEN_DIM = 3
    N_LAYERS = 4
    N_HEADS = 5
    N_KV_HEADS = 6
    N_EXPERTS = 7
    N_ACTIVE_EXPERTS = 8
    VOCAB_SIZE = 9
    SEQ_LEN = 10
    HIDDEN_ACT = 11
    ROPE_THETA = 12
    WEIGHT_FLOAT_TYPE = 13
    ROPE_SCALING_FACTOR = 14
    ROPE_SCALING_LOW_FREQ_FACTOR = 15
    ROPE_SCALING_HIGH_FREQ_FACTOR = 16
    ROPE_SCALING_ORIG_MAX_SEQ_LEN = 17
    ROPE_TYPE = 18
    HEAD_DIM = 19
    NORM_EPSILON = 20
    MOE_HIDDEN_DIM = 21


class ArchType(IntEnum):
    LLAMA = 0xABCD00
    QWEN3 = 0xABCD01
    QWEN3_MOE = 0xABCD02


class HiddenAct(IntEnum):
    GELU = 0
    SILU = 1


class RopeType(IntEnum):
    LLAMA = 0  # pairs (2i, 2i+1) rotate together: q/k rows are stored permuted for it
    FALCON = 1  # NeoX style: pairs (i, i + head_dim/2)
    LLAMA3_1 = 2  # Llama with Llama 3.1 frequency scaling


NORM_EPSILONS = {5: 1e-5, 6: 1e-6}


def nearest_norm_epsilon(value: object) -> float:
    """The norm epsilon a ``.m`` header can hold that ``value`` (read from float32 or JSON) is;
    ValueError when it is none of them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for eps in NORM_EPSILONS.values():
            if abs(value - eps) <= eps * 1e-3:
                return eps
    raise ValueError(f"{value!r} is not representable in .m files (1e-5 or 1e-6)")


@dataclass(frozen=True)
class ModelHeader:
    """Everything the header says, with distributed-llama's defaults for absent keys."""

    arch: ArchType
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    weight_type: FloatType
    version: int = 0
    n_experts: int = 0
    n_active_experts: int = 0
    hidden_act: HiddenAct = HiddenAct.SILU
    rope_theta: float = 10000.0
    rope_type: RopeType = RopeType.LLAMA
    rope_scaling_factor: float = 1.0
    rope_scaling_low_freq_factor: float = 0.0
    rope_scaling_high_freq_factor: float = 0.0
    rope_scaling_orig_max_seq_len: int = 0
    head_dim: int = 0  # 0: dim / n_heads
    norm_epsilon: float = 1e-5
    moe_hidden_dim: int = 0
    header_size: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def effective_rope_type(self) -> RopeType:
        # Qwen3 checkpoints use NeoX-style rope whatever the header says (as distributed-llama).
        if self.has_qk_norm:
            return RopeType.FALCON
        return self.rope_type

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3 normalizes each q and k head (RMS norm over head_dim) before rope."""
        return self.arch in (ArchType.QWEN3, ArchType.QWEN3_MOE)

    @property
    def is_moe(self) -> bool:
        return self.arch == ArchType.QWEN3_MOE

    def with_seq_len(self, seq_len: int) -> "ModelHeader":
        return replace(self, seq_len=seq_len)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # in values: (rows, columns) or (n,)
    float_type: FloatType

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.float_type.nbytes(self.n_values)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape in stored elements: quantized rows hold blocks of 32 values."""
        per = self.float_type.values_per_element
        return self.shape[:-1] + (self.shape[-1] // per,)


def tensor_plan(h: ModelHeader) -> list[TensorSpec]:
    """Every tensor of the file, in file order (distributed-llama's loader order)."""
    wt = h.weight_type
    f32 = FloatType.F32
    plan = [TensorSpec("embedding", (h.vocab_size, h.dim), f32)]
    for i in range(h.n_layers):
        p = f"layers.{i}."
        plan += [
            TensorSpec(p + "q", (h.q_dim, h.dim), wt),
            TensorSpec(p + "k", (h.kv_dim, h.dim), wt),
            TensorSpec(p + "v", (h.kv_dim, h.dim), wt),
            TensorSpec(p + "o", (h.dim, h.q_dim), wt),
        ]
        if h.is_moe:
            hidden = h.moe_hidden_dim
            plan.append(TensorSpec(p + "router", (h.n_experts, h.dim), f32))
            for e in range(h.n_experts):
                pe = f"{p}experts.{e}."
                plan += [
                    TensorSpec(pe + "w1", (hidden, h.dim), wt),
                    TensorSpec(pe + "w2", (h.dim, hidden), wt),
                    TensorSpec(pe + "w3", (hidden, h.dim), wt),
                ]
        else:
            plan += [
                TensorSpec(p + "w1", (h.hidden_dim, h.dim), wt),
                TensorSpec(p + "w2", (h.dim, h.hidden_dim), wt),
                TensorSpec(p + "w3", (h.hidden_dim, h.dim), wt),
            ]
        if h.has_qk_norm:
            plan += [
                TensorSpec(p + "q_norm", (h.head_dim,), f32),
                TensorSpec(p + "k_norm", (h.head_dim,), f32),
            ]
        plan += [
            TensorSpec(p + "attn_norm", (h.dim,), f32),
            TensorSpec(p + "ffn_norm", (h.dim,), f32),
        ]
    plan += [
        TensorSpec("final_norm", (h.dim,), f32),
        TensorSpec("output", (h.vocab_size, h.dim), wt),
    ]
    return plan


def expected_file_size(h: ModelHeader) -> int:
    """Bytes the whole file must have, computed without listing every tensor of a huge header."""
    one = replace(h, n_layers=1, n_experts=1 if h.is_moe else 0, n_active_experts=1 if h.is_moe else 0)
    specs = tensor_plan(one)
    layer = [s for s in specs if s.name.startswith("layers.")]
    # With one expert, the router (a row per expert) and the expert weights are one expert's share.
    expert = sum(s.nbytes for s in layer if ".experts." in s.name or s.name.endswith(".router"))
    per_layer = sum(s.nbytes for s in layer) + expert * (h.n_experts - 1 if h.is_moe else 0)
    rest = sum(s.nbytes for s in specs if not s.name.startswith("layers."))
    return h.header_size + rest + h.n_layers * per_layer


def _enum(cls, value: int, what: str):
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"unsupported {what} {value:#x}" if value > 255 else f"unsupported {what} {value}") from None


def _header_from_pairs(pairs: list[tuple[int, int]]) -> ModelHeader:
    values: dict[HeaderKey, int] = {}
    for key, value in pairs:
        try:
            k = HeaderKey(key)
        except ValueError:
            raise ValueError(f"unknown header key {key}") from None
        if k in values:
            raise ValueError(f"header key {k.name.lower()} appears twice")
        values[k] = value
    for required in (HeaderKey.DIM, HeaderKey.N_LAYERS, HeaderKey.N_HEADS, HeaderKey.N_KV_HEADS,
                     HeaderKey.VOCAB_SIZE, HeaderKey.SEQ_LEN, HeaderKey.WEIGHT_FLOAT_TYPE):
        if required not in values:
            raise ValueError(f"header has no {required.name.lower()}")
    eps_code = values.get(HeaderKey.NORM_EPSILON, 5)
    if eps_code not in NORM_EPSILONS:
        raise ValueError(f"unsupported norm epsilon code {eps_code} (5 or 6)")
    g = values.get
    return ModelHeader(
        version=g(HeaderKey.VERSION, 0),
        arch=_enum(ArchType, g(HeaderKey.ARCH_TYPE, ArchType.LLAMA), "architecture"),
        dim=values[HeaderKey.DIM],
        hidden_dim=g(HeaderKey.HIDDEN_DIM, 0),
        n_layers=values[HeaderKey.N_LAYERS],
        n_heads=values[HeaderKey.N_HEADS],
        n_kv_heads=values[HeaderKey.N_KV_HEADS],
        n_experts=g(HeaderKey.N_EXPERTS, 0),
        n_active_experts=g(HeaderKey.N_ACTIVE_EXPERTS, 0),
        vocab_size=values[HeaderKey.VOCAB_SIZE],
        seq_len=values[HeaderKey.SEQ_LEN],
        hidden_act=_enum(HiddenAct, g(HeaderKey.HIDDEN_ACT, HiddenAct.SILU), "hidden activation"),
        rope_theta=float(g(HeaderKey.ROPE_THETA, 10000)),
        weight_type=_enum(FloatType, values[HeaderKey.WEIGHT_FLOAT_TYPE], "weight float type"),
        rope_scaling_factor=float(g(HeaderKey.ROPE_SCALING_FACTOR, 1)),
        rope_scaling_low_freq_factor=float(g(HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR, 0)),
        rope_scaling_high_freq_factor=float(g(HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR, 0)),
        rope_scaling_orig_max_seq_len=g(HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN, 0),
        rope_type=_enum(RopeType, g(HeaderKey.ROPE_TYPE, RopeType.LLAMA), "rope type"),
        head_dim=g(HeaderKey.HEAD_DIM, 0),
        norm_epsilon=NORM_EPSILONS[eps_code],
        moe_hidden_dim=g(HeaderKey.MOE_HIDDEN_DIM, 0),
    )


INT32_MAX = 2**31 - 1


def validate_header(h: ModelHeader) -> None:
    """Raise ValueError when the header describes a model the forward pass cannot run."""
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "n_experts", "n_active_experts",
                 "vocab_size", "seq_len", "head_dim", "moe_hidden_dim", "rope_scaling_orig_max_seq_len",
                 "rope_theta", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                 "rope_scaling_high_freq_factor"):
        if abs(getattr(h, name)) > INT32_MAX:
            raise ValueError(f"{name} {getattr(h, name):g} does not fit a .m header (32-bit integers)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len", "head_dim"):
        if getattr(h, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(h, name)}")
    if h.is_moe:
        if h.n_experts <= 0 or not 0 < h.n_active_experts <= h.n_experts or h.moe_hidden_dim <= 0:
            raise ValueError("MoE model needs experts > 0, 0 < active experts <= experts and a MoE hidden dim")
    elif h.hidden_dim <= 0:
        raise ValueError(f"hidden_dim must be positive, got {h.hidden_dim}")
    if h.n_heads % h.n_kv_heads:
        raise ValueError(f"heads ({h.n_heads}) must be a multiple of KV heads ({h.n_kv_heads})")
    if h.rope_theta <= 0:
        raise ValueError(f"rope theta must be positive, got {h.rope_theta:g}")
    if h.head_dim % 2:
        raise ValueError(f"head dim must be even for rope, got {h.head_dim}")
    if h.weight_type.is_quantized:
        for name in ("dim", "q_dim", "hidden_dim", "moe_hidden_dim"):
            if getattr(h, name) % BLOCK_SIZE:
                raise ValueError(f"{name} ({getattr(h, name)}) must be a multiple of {BLOCK_SIZE} "
                                 f"for {h.weight_type.name} weights")
    if h.effective_rope_type == RopeType.LLAMA3_1 and (
            h.rope_scaling_orig_max_seq_len <= 0 or h.rope_scaling_factor <= 0
            or h.rope_scaling_high_freq_factor <= h.rope_scaling_low_freq_factor):
        raise ValueError("Llama 3.1 rope needs scaling factor, low < high frequency factors "
                         "and the original max sequence length")


def encode_header(h: ModelHeader) -> bytes:
    """The header bytes; writes only keys distributed-llama knows for this model."""
    validate_header(h)
    eps_code = min(NORM_EPSILONS, key=lambda c: abs(NORM_EPSILONS[c] - h.norm_epsilon))
    pairs = [
        (HeaderKey.VERSION, h.version),
        (HeaderKey.ARCH_TYPE, int(h.arch)),
        (HeaderKey.DIM, h.dim),
        (HeaderKey.HIDDEN_DIM, h.hidden_dim),
        (HeaderKey.N_LAYERS, h.n_layers),
        (HeaderKey.N_HEADS, h.n_heads),
        (HeaderKey.N_KV_HEADS, h.n_kv_heads),
        (HeaderKey.N_EXPERTS, h.n_experts),
        (HeaderKey.N_ACTIVE_EXPERTS, h.n_active_experts),
        (HeaderKey.VOCAB_SIZE, h.vocab_size),
        (HeaderKey.SEQ_LEN, h.seq_len),
        (HeaderKey.HIDDEN_ACT, int(h.hidden_act)),
        (HeaderKey.ROPE_THETA, int(round(h.rope_theta))),
        (HeaderKey.WEIGHT_FLOAT_TYPE, int(h.weight_type)),
        (HeaderKey.ROPE_TYPE, int(h.rope_type)),
        (HeaderKey.HEAD_DIM, h.head_dim),
        (HeaderKey.NORM_EPSILON, eps_code),
    ]
    if h.rope_type == RopeType.LLAMA3_1:
        pairs += [
            (HeaderKey.ROPE_SCALING_FACTOR, int(round(h.rope_scaling_factor))),
            (HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR, int(round(h.rope_scaling_low_freq_factor))),
            (HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR, int(round(h.rope_scaling_high_freq_factor))),
            (HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN, h.rope_scaling_orig_max_seq_len),
        ]
    if h.is_moe:
        pairs.append((HeaderKey.MOE_HIDDEN_DIM, h.moe_hidden_dim))
    body = b"".join(struct.pack("<ii", int(k), int(v)) for k, v in pairs)
    return struct.pack("<ii", MAGIC, 8 + len(body)) + body


def parse_header(data: bytes) -> ModelHeader:
    """A header from its bytes (the start of a ``.m`` file, or sent over the network)."""
    if len(data) < 8:
        raise ValueError("file is too short to be a model file")
    magic, size = struct.unpack("<ii", data[:8])
    if magic in OLD_MAGICS:
        raise ValueError(f"old model format (magic {magic:#x}) is not supported; convert the model again")
    if magic != MAGIC:
        raise ValueError(f"not a distributed-llama model file (magic {magic & 0xFFFFFFFF:#010x})")
    if size < 8 or (size - 8) % 8 or size > MAX_HEADER_BYTES:
        raise ValueError(f"invalid header size {size}")
    if len(data) < size:
        raise ValueError("file ends inside the header")
    n = (size - 8) // 4
    ints = struct.unpack(f"<{n}i", data[8:size])
    header = _header_from_pairs(list(zip(ints[0::2], ints[1::2])))
    validate_header(header)
    return replace(header, header_size=size)


def read_header(path: str | os.PathLike) -> ModelHeader:
    """Parse and check the header of a ``.m`` file (not the tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<ii", head)[1] if len(head) == 8 else 0
            return parse_header(head + f.read(max(0, min(size, MAX_HEADER_BYTES) - 8)))
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read model file: {e.strerror or e}") from None


class ModelFile:
    """A memory-mapped ``.m`` file: ``tensors[name]`` are read-only views of stored elements."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_header(self.path)
        expected = expected_file_size(self.header)
        actual = self.path.stat().st_size
        if actual < expected:
            raise FormatError(f"{self.path}: file is truncated: the header implies {expected} bytes, "
                              f"the file has {actual}")
        if actual > expected:
            raise FormatError(f"{self.path}: file has {actual - expected} unexpected bytes after the "
                              f"last tensor (the header implies {expected} bytes)")
        self.plan = tensor_plan(self.header)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors: dict[str, np.ndarray] = {}
        self.specs: dict[str, TensorSpec] = {}
        offset = self.header.header_size
        for spec in self.plan:
            raw = self._map[offset:offset + spec.nbytes]
            self.tensors[spec.name] = raw.view(spec.float_type.element_dtype).reshape(spec.stored_shape)
            self.specs[spec.name] = spec
            offset += spec.nbytes

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.plan)


class ModelWriter:
    """Writes a ``.m`` file tensor by tensor in plan order; the file appears only when complete.

    Use as a context manager; ``write(name, values)`` takes float values (converted to the
    tensor's type) or already-encoded elements of the right dtype.
    """

    def __init__(self, path: str | os.PathLike, header: ModelHeader):
        self.path = Path(path)
        self.header = header
        self.plan = tensor_plan(header)
        self._next = 0
        head = encode_header(header)  # a bad header fails before any file exists
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file, self._tmp = open_temporary(self.path)
        self._file.write(head)

    def __enter__(self) -> "ModelWriter":
        return self

    def write(self, name: str, values: np.ndarray, importance: np.ndarray | None = None) -> None:
        """Append tensor ``name``; ``importance`` (one value per column) steers the rounding of
        float values to Q40 (``quants.quantize_q40``); encoded elements are written as they are."""
        if self._next >= len(self.plan):
            raise ValueError(f"unexpected tensor {name}: all tensors are written")
        spec = self.plan[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name}, got {name}")
        values = np.asarray(values)
        if values.dtype == spec.float_type.element_dtype:
            data = values
            if data.shape != spec.stored_shape:
                raise ValueError(f"{name}: shape {data.shape}, expected {spec.stored_shape} elements")
        else:
            if values.shape != spec.shape:
                raise ValueError(f"{name}: shape {values.shape}, expected {spec.shape}")
            if spec.float_type == FloatType.Q40:  # the JIT search under numba: the same bytes, faster
                data = q40_quantizer()(values, importance)
            else:
                data = from_float32(values, spec.float_type)
        self._file.write(np.ascontiguousarray(data).tobytes())
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.plan):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"model incomplete: {len(self.plan) - self._next} tensors not written")
        publish(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
