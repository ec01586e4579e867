"""The SentencePiece path (Llama 2 style) gives exactly the ids of the real ``sentencepiece`` library.

A small BPE model is trained here with Llama 2's tokenizer settings, stored the way llama.cpp's
converter stores a SentencePiece tokenizer in a GGUF, read back by our GGUF import, written to a
``.t`` + sidecar and read again; the resulting ``Tokenizer`` must agree with ``sentencepiece``.
"""
from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.engine.tokenizer import Tokenizer
from dllama.formats.gguf_tokenizer import (
    TYPE_BYTE,
    TYPE_CONTROL,
    TYPE_NORMAL,
    TYPE_UNKNOWN,
    tokenizer_from_gguf,
)
from dllama.formats.tfile import read_tokenizer, write_tokenizer

_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "seven", "wizards",
    "quietly", "hex", "a", "model", "reads", "tokens", "and", "writes", "text", "into", "its", "little",
    "buffer", "every", "single", "day", "distributed", "inference", "runs", "on", "many", "small",
    "machines", "with", "one", "root", "node", "hello", "world", "program", "compiler", "python",
    "rust", "layer", "weight", "matrix", "vector"
]
_ACCENTED = [
    "café", "naïve", "résumé", "jalapeño", "façade", "über", "Straße", "garçon", "Ångström", "déjà",
    "vu", "piñata"
]
# Only a few CJK characters: most CJK is left to byte fallback.
_CJK = ["日本語", "中文", "東京", "大阪", "学生", "先生"]
_PUNCT = list(".,;:!?-()\"'") + ["...", "--", "?!", "'s"]


def _corpus(n_lines: int = 400, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.65:
                w = rng.choice(_WORDS)
                parts.append(w.capitalize() if rng.random() < 0.15 else w)
            elif r < 0.75:
                parts.append(rng.choice(_ACCENTED))
            elif r < 0.8:
                parts.append(rng.choice(_CJK))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts[-1:] = [(parts[-1] if parts else "") + rng.choice(_PUNCT)]
        sep = "  " if rng.random() < 0.1 else " "
        lines.append(sep.join(parts))
    # Rare characters (seen once): character_coverage drops them, so they need byte fallback.
    lines.append("rare: ŧħŋ ∂ƒ ©®")
    return lines


def train_llama2_style(folder: Path) -> Path:
    """A small BPE SentencePiece model with Llama 2's trainer settings, trained on _corpus()."""
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "m"), model_type="bpe", vocab_size=600,
        character_coverage=0.9995, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentencepiece_length=16, num_threads=1,
        minloglevel=2)
    return folder / "m.model"


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return spm.SentencePieceProcessor(model_file=str(train_llama2_style(tmp_path_factory.mktemp("spm"))))


def _gguf_of(sp, path) -> None:
    """A GGUF with only the tokenizer, as llama.cpp's converter writes a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TYPE_UNKNOWN if sp.is_unknown(i) else TYPE_CONTROL if sp.is_control(i)
                     else TYPE_BYTE if sp.is_byte(i) else TYPE_NORMAL)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tok(sp, tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("spm-gguf")
    _gguf_of(sp, d / "tok.gguf")
    data = tokenizer_from_gguf(gguf.GGUFReader(str(d / "tok.gguf")))
    assert data.kind == "sentencepiece" and data.add_space_prefix and data.add_bos
    write_tokenizer(d / "tok.t", data)
    back = read_tokenizer(d / "tok.t")
    assert back.kind == "sentencepiece"
    assert back.vocab == data.vocab and back.special_ids == data.special_ids
    return Tokenizer(back)


def test_model_is_llama2_like(sp):
    n = sp.get_piece_size()
    assert n == 600
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sum(sp.is_byte(i) for i in range(n)) == 256
    # Some characters of the corpus were left out of the vocabulary: they need byte fallback.
    assert sp.encode("ŧ") != [sp.piece_to_id("▁"), sp.piece_to_id("ŧ")]
    assert any(sp.is_byte(i) for i in sp.encode("ŧħŋ"))
    # Whitespace-only pieces exist (allow_whitespace_only_pieces).
    assert sp.piece_to_id("▁▁") != sp.unk_id()


EDGE_CASES = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "a", "the", " the", "the ", "  the  ",
    "Hello world", "hello   world", "hello\tworld\n", "line one\nline two\n\nline three",
    "   leading spaces", "trailing spaces   ", "tabs\t\tand  spaces", "\ttab first",
    "12345", "3.14159", "Room 101, floor 7", "2024-01-31T12:00:00Z", "1,000,000",
    "...", "?!?!", "--->", "(a, b); [c] {d}", "\"quoted\" and 'single'", "e.g., i.e., etc.",
    "café naïve résumé", "Straße über Ångström", "déjà vu", "Ωμέγα ελληνικά",
    "日本語", "東京 大阪", "鬱", "龘", "日本語の文章です。", "中文字符串测试",
    "emoji 👍 here", "🦙🦙", "👨‍👩‍👧", "🇵🇱", "ŧħŋ", "∂ƒ ©®", "€100",
    "\u00a0nbsp", "\u200bzero width",
    # Special and byte-token texts are plain text; a typed U+2581 is read as the space it stands for.
    "<s>", "</s>", "<unk>", "<0x41>", "a<s>b", "▁", "a▁b", "▁▁hello",
    "The quick brown fox jumps over the lazy dog.",
    "distributed inference runs on many small machines with one root node",
    "x" * 200, " " * 33, "ab" * 50,
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_encode_matches_sentencepiece(sp, tok, text):
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@pytest.mark.parametrize("text", ["Hello world", "", " x", "日本語"])
def test_bos(sp, tok, text):
    assert tok.add_bos and tok.bos_id == sp.bos_id() == 1
    assert tok.encode(text, add_bos=True) == [1] + sp.encode(text)
    assert tok.encode(text) == [1] + sp.encode(text)  # the GGUF says add_bos


@pytest.mark.parametrize("text", EDGE_CASES)
def test_decode_round_trip(sp, tok, text):
    ids = sp.encode(text)
    expected = sp.decode(ids)
    assert tok.decode(ids) == expected
    if expected == text:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


_ALPHABET = list(" \t\n.,!?-'\"0123456789aeiouthsnrlEHTé日本語ŧ👍\u00a0▁") + _WORDS[:12]
_texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.lists(st.sampled_from(_ALPHABET), max_size=30).map("".join),
)


@settings(max_examples=200, deadline=None)
@given(_texts)
def test_random_text_matches_sentencepiece(sp, tok, text):
    ids = tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
