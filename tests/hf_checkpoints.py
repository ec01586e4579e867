"""Tiny Hugging Face checkpoints, written byte for byte in the layout ``save_pretrained`` gives.

Independent of dllama on purpose (nothing of it is imported): the safetensors files are
written by the safetensors library itself (``safetensors.numpy``, bfloat16 arrays from
``ml_dtypes``, so no torch), the configs spell what transformers writes for
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen3ForCausalLM`` and
``Qwen3MoeForCausalLM``, and the tokenizer is a byte-level BPE trained with the ``tokenizers``
library.

``write_checkpoint(folder, arch, ...)`` returns the config and the weights as the checkpoint
really stores them (bf16/f16/f32-rounded values, as float64), with Hugging Face's names and
shapes, for the float64 reference in ``tests/hf_reference.py``.

Sizes are chosen so that every model splits over 1, 2 and 3 nodes and quantizes to Q40/Q80:
hidden sizes and feed-forward sizes are multiples of 32; Llama has 6 query heads and 3 KV
heads; the Qwen3 models have a head size (32) that is not ``hidden_size / heads``.
"""
from __future__ import annotations

import copy
import functools
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

ARCHS = ("llama", "mistral", "qwen3", "qwen3_moe")

# Llama 3.1's rope_scaling, exactly as its config.json has it.
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

# Special tokens (appended after the BPE vocabulary, as Llama 3 and Qwen have them), the BOS
# and EOS tokens, whether a BOS is added, and a small chat template, per tokenizer family.
_LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                     "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TOKENIZER_FAMILIES = {
    "llama": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
                  bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, template=_LLAMA_TEMPLATE,
                  digits="{1,3}", nfc=False),
    "mistral": dict(specials=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", add_bos=True,
                    template=_MISTRAL_TEMPLATE, digits="{1,3}", nfc=False),
    "qwen": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                 add_bos=False, template=_QWEN_TEMPLATE, digits="", nfc=True),
}
_FAMILY_OF = {"llama": "llama", "mistral": "mistral", "qwen3": "qwen", "qwen3_moe": "qwen"}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.
The capital of France is Paris, and the capital of Italy is Rome. Berlin is the capital of Germany.
Once upon a time there was a little model that wanted to learn how to speak. It read every book it
could find, from the history of the Roman empire to the theory of numbers, and it wrote down the
words that came together most often. Soon it knew that "the" comes before "model", that "of" follows
"history", and that numbers like 12, 345 and 6789 are written with digits.
Distributed inference splits a large language model over several computers on one network. Each node
holds a slice of every weight matrix: some attention heads, some rows of the feed-forward layers, and a
share of the vocabulary. After every block the nodes exchange their partial results and add them up.
Quantization stores weights in blocks of thirty-two values with one scale per block, trading a little
accuracy for much less memory and faster reading. Rotary position embeddings turn each pair of values
by an angle that grows with the position of the token in the sequence.
Hello, world! How are you today? I'm fine, thanks; and you? We'll see what they've done with it.
def main():\n    print("hello world")\n    return 0\n
Mixture of experts models route every token to a few experts chosen by a small router network; the
router's scores are turned into probabilities, the best experts are kept, and their outputs are mixed.
Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures.
Qwen and Llama and Mistral are families of open language models with similar transformer layers.
"""


class Checkpoint(NamedTuple):
    folder: Path
    config: dict
    weights: dict[str, np.ndarray]  # float64, the values the checkpoint stores, HF names and shapes


# -- configs -----------------------------------------------------------------------------------

def make_config(arch: str, rope_scaling: bool | dict | None = False, dtype: str = "bf16",
                vocab_padding: int = 0, **overrides: Any) -> dict:
    """``config.json`` as transformers writes it for a tiny model of ``arch``; ``vocab_padding``
    embedding rows beyond the tokenizer's tokens (as Qwen's 151936 rows for 151669 tokens)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    common = dict(architectures=[_ARCHITECTURES[arch]], attention_bias=False, attention_dropout=0.0,
                  hidden_act="silu", initializer_range=0.02, num_hidden_layers=2, use_cache=True,
                  torch_dtype=_TORCH_DTYPES[dtype], transformers_version="4.51.0")
    if arch == "llama":
        cfg = dict(common, model_type="llama", hidden_size=96, intermediate_size=160, num_attention_heads=6,
                   num_key_value_heads=3, max_position_embeddings=256, mlp_bias=False, pretraining_tp=1,
                   rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False,
                   vocab_size=384, bos_token_id=None, eos_token_id=None)
    elif arch == "mistral":
        cfg = dict(common, model_type="mistral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=None, max_position_embeddings=256, rms_norm_eps=1e-5,
                   rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, vocab_size=352,
                   bos_token_id=None, eos_token_id=None)
    elif arch == "qwen3":
        # rope_theta is an integer in Qwen3-0.6B's config.json.
        cfg = dict(common, model_type="qwen3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=256, max_window_layers=2,
                   rms_norm_eps=1e-6, rope_theta=1000000, rope_scaling=None, sliding_window=None,
                   use_sliding_window=False, tie_word_embeddings=True, vocab_size=320,
                   bos_token_id=None, eos_token_id=None)
    else:
        cfg = dict(common, model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
                   moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                   router_aux_loss_coef=0.001, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=256, max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   rope_scaling=None, sliding_window=None, use_sliding_window=False, tie_word_embeddings=False,
                   vocab_size=320, bos_token_id=None, eos_token_id=None)
    if rope_scaling is True:
        cfg["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    elif isinstance(rope_scaling, dict):
        cfg["rope_scaling"] = dict(rope_scaling)
    cfg.update(overrides)
    # BOS/EOS ids follow the tokenizer (its special tokens come after the BPE vocabulary).
    fam = TOKENIZER_FAMILIES[_FAMILY_OF[arch]]
    ids = special_ids(arch, cfg["vocab_size"] - vocab_padding)
    if "bos_token_id" not in overrides:
        # Qwen's bos_token_id is <|endoftext|> although its tokenizer adds no BOS.
        cfg["bos_token_id"] = ids[fam["bos"] or "<|endoftext|>"]
    if "eos_token_id" not in overrides:
        cfg["eos_token_id"] = ids[fam["eos"]]
    return dict(sorted(cfg.items()))


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# -- weights -----------------------------------------------------------------------------------

def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the state dict, in state-dict order, with its shape (out, in)."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    D, nh, nkv = head_dim(cfg), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qwen = cfg["model_type"] in ("qwen3", "qwen3_moe")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (nh * D, H)
        shapes[p + "self_attn.k_proj.weight"] = (nkv * D, H)
        shapes[p + "self_attn.v_proj.weight"] = (nkv * D, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, nh * D)
        if qwen:
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
        if is_sparse_layer(cfg, i):
            E, F = cfg["num_experts"], cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (E, H)
            for e in range(E):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (F, H)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (F, H)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, F)
        else:
            F = cfg["intermediate_size"]
            shapes[p + "mlp.gate_proj.weight"] = (F, H)
            shapes[p + "mlp.up_proj.weight"] = (F, H)
            shapes[p + "mlp.down_proj.weight"] = (H, F)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes["model.norm.weight"] = (H,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def is_sparse_layer(cfg: dict, i: int) -> bool:
    """Qwen3-MoE's rule for which layers have experts."""
    if cfg["model_type"] != "qwen3_moe":
        return False
    step = cfg.get("decoder_sparse_step", 1)
    return i not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0 and (i + 1) % step == 0


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 values of a scale that keeps activations sane: linear weights ~N(0, 0.1²)
    (so a projection of a unit-RMS input has entries of about 0.1·sqrt(in)), embeddings ~N(0, 0.5²)
    (logits spread by a few units), norms 1 ± 0.1, and a router of ~N(0, 0.5²) so that its
    logits differ by units and the top-k choice is not a near-tie."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            v = 0.5 * rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight"):
            v = 0.5 * rng.standard_normal(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        out[name] = v
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float values -> bfloat16 bit patterns (uint16), rounded as the checkpoint stores them
    (float32 first, as a model in float32 saved as bfloat16; then ml_dtypes' round to nearest
    even)."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32: by definition the upper half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the array as stored, the stored values as float64)."""
    if dtype == "bf16":
        v = to_bf16_bits(x).view(ml_dtypes.bfloat16)
    elif dtype == "f16":
        v = np.asarray(x).astype("<f2")
    elif dtype == "f32":
        v = np.asarray(x).astype("<f4")
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    return v, v.astype(np.float64)


# -- safetensors -------------------------------------------------------------------------------

# safetensors dtype names -> NumPy's, for tests that take a written file apart and write it again.
NUMPY_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
                "I32": np.dtype("<i4")}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file: for tests that look at the
    layout or break a file (the library hands out tensors, not its header and offsets)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file as the safetensors library parses it
    (bfloat16 included, which its NumPy loader does not map)."""
    from safetensors import deserialize, safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = {name: np.frombuffer(t["data"], dtype=NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])
               for name, t in deserialize(Path(path).read_bytes())}
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written by the safetensors library, as save_pretrained writes them
    (metadata {"format": "pt"} unless given)."""
    from safetensors.numpy import save_file

    save_file({n: np.ascontiguousarray(v) for n, v in tensors.items()}, str(path),
              metadata=metadata if metadata is not None else {"format": "pt"})


def split_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """State-dict order cut into ``shards`` consecutive groups of about equal bytes (none empty)."""
    if shards > len(names):
        raise ValueError("more shards than tensors")
    total = sum(sizes[n] for n in names)
    cum = np.cumsum([sizes[n] for n in names])
    cuts = [0]
    for k in range(1, shards):
        c = int(np.searchsorted(cum, k * total / shards)) + 1  # the group ends after the tensor crossing k/n
        c = min(max(c, cuts[-1] + 1), len(names) - (shards - k))
        cuts.append(c)
    cuts.append(len(names))
    return [names[a:b] for a, b in zip(cuts, cuts[1:])]


# -- tokenizer ---------------------------------------------------------------------------------

def _pattern(digits: str) -> str:
    # Llama 3's pre-tokenizer regex (numbers in runs of up to 3); Qwen2's splits single digits.
    num = r"\p{N}" + digits
    return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + num +
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def special_ids(arch: str, vocab_size: int) -> dict[str, int]:
    specials = TOKENIZER_FAMILIES[_FAMILY_OF[arch]]["specials"]
    first = vocab_size - len(specials)
    return {s: first + i for i, s in enumerate(specials)}


@functools.lru_cache(maxsize=None)
def tokenizer_json(family: str, vocab_size: int) -> str:
    """``tokenizer.json`` of a byte-level BPE of exactly ``vocab_size`` tokens: BPE tokens first
    (the 256 byte symbols, then merges), the family's special tokens last."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    fam = TOKENIZER_FAMILIES[family]
    specials = fam["specials"]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama"))
    if fam["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_pattern(fam["digits"])), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_bpe = vocab_size - len(specials)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        raise ValueError(f"the corpus gives {tok.get_vocab_size()} BPE tokens, not {n_bpe}")
    tok.add_special_tokens(specials)
    bl = processors.ByteLevel(trim_offsets=False)
    if fam["add_bos"]:
        bos = fam["bos"]
        tok.post_processor = processors.Sequence([bl, processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab_size - len(specials) + specials.index(bos))])])
    else:
        tok.post_processor = bl
    assert tok.get_vocab_size() == vocab_size
    return tok.to_str()


def tokenizer_config(arch: str) -> dict:
    fam = TOKENIZER_FAMILIES[_FAMILY_OF[arch]]
    cfg: dict[str, Any] = {"add_bos_token": fam["add_bos"], "add_eos_token": False,
                           "bos_token": fam["bos"], "eos_token": fam["eos"],
                           "chat_template": fam["template"], "clean_up_tokenization_spaces": False,
                           "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    if _FAMILY_OF[arch] == "qwen":
        cfg.update(pad_token="<|endoftext|>", errors="replace", split_special_tokens=False,
                   tokenizer_class="Qwen2Tokenizer")
    return cfg


# -- the whole checkpoint ----------------------------------------------------------------------

def write_checkpoint(folder: str | Path, arch: str, dtype: str = "bf16", shards: int = 2,
                     rope_scaling: bool | dict | None = False, seed: int = 0, tokenizer: bool = True,
                     vocab_padding: int = 0, **overrides: Any) -> Checkpoint:
    """Write a tiny checkpoint of ``arch`` (llama, mistral, qwen3, qwen3_moe) into ``folder``.

    dtype: bf16 (default), f16 or f32 safetensors; shards: the number of ``model-0000k-of-0000n``
    files (with ``model.safetensors.index.json``), or 1 for a single ``model.safetensors``;
    rope_scaling: True for Llama 3.1's, a dict for another, False/None for none; overrides: any
    config.json keys (sizes included: the weights follow the final config); vocab_padding: the
    config's vocab_size exceeds the tokenizer's by that many (unused) embedding rows.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = make_config(arch, rope_scaling=rope_scaling, dtype=dtype, vocab_padding=vocab_padding, **overrides)
    raw = random_weights(cfg, seed)
    stored, weights = {}, {}
    for name, v in raw.items():
        stored[name], weights[name] = encode(v, dtype)
    if shards <= 1:
        write_safetensors(folder / "model.safetensors", stored)
    else:
        names = list(stored)
        groups = split_shards(names, {n: stored[n].nbytes for n in names}, shards)
        weight_map = {}
        for k, group in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(folder / file, {n: stored[n] for n in group})
            weight_map.update({n: file for n in group})
        index = {"metadata": {"total_size": sum(v.nbytes for v in stored.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": True,
           "temperature": 0.6, "top_p": 0.9, "transformers_version": cfg["transformers_version"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer:
        (folder / "tokenizer.json").write_text(tokenizer_json(_FAMILY_OF[arch], cfg["vocab_size"] - vocab_padding))
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(arch), indent=2) + "\n")
        fam = TOKENIZER_FAMILIES[_FAMILY_OF[arch]]
        smap = {"eos_token": fam["eos"]} | ({"bos_token": fam["bos"]} if fam["bos"] else {})
        (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    return Checkpoint(folder, copy.deepcopy(cfg), weights)


def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, in order."""
    return sorted(Path(folder).glob("*.safetensors"))
