"""Hugging Face tokenizer folders converted to .t + sidecar give exactly the source's token ids.

The references are the real libraries: ``tokenizers`` for tokenizer.json (Llama 3's, Qwen3's and
Llama 2's real files, and small Qwen-, SmolLM-, GPT-2- and SentencePiece-style ones trained or
built here) and
``sentencepiece`` for tokenizer.model. Every conversion goes through ``write_tokenizer`` and
``Tokenizer.load``, so the sidecar carries everything that matters.
"""
from __future__ import annotations

import json
import struct
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from dllama.engine.pretokenizer import pre_tokenize
from dllama.engine.tokenizer import Tokenizer
from dllama.errors import FormatError
from dllama.formats.gguf_tokenizer import gpt2_unicode_to_byte
from dllama.formats.hf_tokenizer import placeholder, tokenizer_from_hf
from dllama.formats.hf_tokenizer_json import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX
from dllama.formats.tfile import TokenizerData, read_tokenizer, sidecar_path, write_tokenizer
from tests.test_sentencepiece import EDGE_CASES as SPM_EDGE_CASES
from tests.test_sentencepiece import _corpus, train_llama2_style

TEXTS = [
    "", " ", "  ", "a", "Hello world", "Hello, World! How are you?", "hello   world", "  leading and trailing  ",
    "DON'T STOP 'TIL", "I'M", "we'll they've she'd you're it's", "'S 'LL 'Re 'ſa 'ſſ", "don't",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }", '#include <stdio.h>\n\nint main(void) { printf("%d\\n", 42); }',
    "1", "12", "123", "1234", "12345", "123456", "1234567", "123456789012345", "3.14159 1,000,000 2024-05-17 12:30",
    "x1y22z333", "٣٤٥ ①② ½", "a  b   c    d", "\t\tindent", "\tindented\n\t\tmore",
    "line one\nline two\r\nline three\n\n\nend\n", " \n ", "x \n\n y", "\r\n\r\n", "\n", "\r",
    "Café naïve résumé Ångström Łódź façade", "e\u0301 (combining) vs é", "A\u030a Å", "ﬁ ligature ² ⅷ",
    "你好，世界！", "日本語のテキストです。", "한국어 문장입니다", "مرحبا بالعالم", "שלום עולם", "Привет, мир!",
    "नमस्ते दुनिया", "Γειά σου Κόσμε", "I ❤️ 🍕!", "👨\u200d👩\u200d👧\u200d👦", "🇵🇱🇺🇸", "👍🏽 ok", "🦙🦙🦙",
    "a\xa0b", "a\u3000b", "x\u2003\u2003y", "a\u2028b", "\u200bzero\u200dwidth", "a\x1cb\x1fc", "\x00\x01",
    "The quick brown fox jumps over the lazy dog. " * 3, "x" * 100, " " * 17,
]
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u2028\u3000\u200d'sdtmlrevSDTMLVſ0123456789٣①½aZéeß日한👍"
              "\U0001F3FD.,!?<|>_-#$\u0301\u030a\u2581") + ["'s", "'LL", "  ", "\r\n"]


tricky_text = st.lists(st.sampled_from(TRICKY), max_size=30).map("".join)


def texts_with(tokens: list[str]) -> st.SearchStrategy[str]:
    """Random text, text over tricky characters, and either mixed with the given token texts."""
    plain = st.one_of(st.text(max_size=50), tricky_text)
    return st.one_of(plain, st.lists(st.one_of(plain, st.sampled_from(tokens)), max_size=6).map("".join))


def convert(folder: Path, out: Path) -> Tokenizer:
    """folder -> TokenizerData -> .t + sidecar -> Tokenizer, as `dllama` would use it."""
    write_tokenizer(out, tokenizer_from_hf(folder))
    return Tokenizer.load(out)


def sidecar(tok_path: Path) -> dict:
    return json.loads(sidecar_path(tok_path).read_text("utf-8"))


# --- Llama 3: the real tokenizer.json ----------------------------------------------------------
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|reserved_special_token_5|>", "<|eot_id", "|>", "<|"]


@pytest.fixture(scope="session")
def llama3(llama3_hf_folder, tmp_path_factory) -> tuple[Tokenizer, HFTokenizer, TokenizerData]:
    data = tokenizer_from_hf(llama3_hf_folder)
    path = tmp_path_factory.mktemp("llama3") / "llama3.t"
    write_tokenizer(path, data)
    return Tokenizer.load(path), HFTokenizer.from_file(str(llama3_hf_folder / "tokenizer.json")), data


def test_llama3_metadata(llama3, tmp_path):
    tok, hf, data = llama3
    # ignore_merges: true is the llama3 family's default, left to the engine (null).
    assert (data.kind, data.pre, data.ignore_merges, data.normalizer) == ("bpe", "llama3", None, None)
    assert tok._ignore_merges
    # Nothing a version 1 reader would miss: the sidecar stays version 1.
    write_tokenizer(tmp_path / "t.t", data)
    assert sidecar(tmp_path / "t.t")["version"] == 1
    assert tok.vocab_size == hf.get_vocab_size() == 128256
    assert tok.bos_id == 128000 and tok.eos_ids == {128001}
    assert tok.special_ids == set(range(128000, 128256)) and not tok.added_ids
    # This file's post-processor is ByteLevel only: HF adds no BOS, and neither do we.
    assert not tok.add_bos and hf.encode("Hi").ids == tok.encode("Hi")
    assert "<|start_header_id|>" in tok.chat_template
    assert tok.special_id("<|eot_id|>") == 128009 == hf.token_to_id("<|eot_id|>")
    assert tok.piece(128000) == b"<|begin_of_text|>" and tok.piece(220) == b" "


LLAMA3_CHAT = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("text", TEXTS + ["".join(LLAMA3_SPECIALS), LLAMA3_CHAT])
def test_llama3_same_ids_as_hf(llama3, text):
    tok, hf, _ = llama3
    ids = tok.encode(text, add_bos=False, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text


@given(text=texts_with(LLAMA3_SPECIALS))
@settings(max_examples=150, deadline=None)
def test_llama3_random_text(llama3, text):
    tok, hf, _ = llama3
    ids = tok.encode(text, add_bos=False, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_llama3_special_texts_are_plain_text_without_allow_special(llama3):
    tok, _, _ = llama3
    text = "<|start_header_id|>user<|end_header_id|><|eot_id|>"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids and tok.decode(ids) == text


@pytest.fixture(scope="session", params=["qwen3", "llama2"])
def real(request, tmp_path_factory) -> tuple[str, Tokenizer, HFTokenizer]:
    """Qwen3's and Llama 2's real tokenizer.json (NFC + Qwen2 regex + non-special added tokens;
    SentencePiece-style BPE with byte fallback)."""
    folder = request.getfixturevalue(f"{request.param}_hf_folder")
    path = tmp_path_factory.mktemp(request.param) / "t.t"
    write_tokenizer(path, tokenizer_from_hf(folder))
    return request.param, Tokenizer.load(path), HFTokenizer.from_file(str(folder / "tokenizer.json"))


REAL_EXTRAS = ["<think>\nhmm\n</think>\n\nAnswer", "<|im_start|>user\nhi<|im_end|>\n", "<s> </s> <unk>",
               "\u2581underscore\u2581 \u2581", " leading", "cafe\u0301 caf\u00e9"]


def test_real_metadata(real):
    name, tok, hf = real
    assert tok.vocab_size == hf.get_vocab_size()
    if name == "qwen3":
        assert (tok.bos_id, tok.add_bos, sorted(tok.eos_ids)) == (-1, False, [151645])
        assert tok.data.normalizer == "NFC" and tok.data.pre == "qwen2"
        assert hf.token_to_id("<think>") in tok.added_ids and hf.token_to_id("<|im_end|>") in tok.special_ids
        assert "<|im_start|>" in tok.chat_template
    else:
        assert (tok.bos_id, tok.add_bos, sorted(tok.eos_ids), tok.kind) == (1, True, [2], "sentencepiece")
        # Llama 2's post-processor adds BOS, as our add_bos does.
        assert hf.encode("Hello").ids == tok.encode("Hello")


@pytest.mark.parametrize("text", TEXTS + REAL_EXTRAS)
def test_real_same_ids_as_hf(real, text):
    _, tok, hf = real
    ids = tok.encode(text, add_bos=False, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids


@given(text=tricky_text)
@settings(max_examples=150, deadline=None)
def test_real_random_text(real, text):
    _, tok, hf = real
    assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False).ids


def test_long_s_contraction_like_hf_regex():
    # HF's (?i:'s|...) folds case: "'ſ" (long s) is a contraction; llama.cpp's '[sS] would miss it.
    for regex, family in ((LLAMA3_REGEX, "llama3"), (QWEN2_REGEX, "qwen2")):
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        for text in ("'ſa", "'ſſ", "x'ſ 'S's"):
            assert pre_tokenize(text, family) == [p for p, _ in split.pre_tokenize_str(text)]


# --- small trained byte-level tokenizers ------------------------------------------------------------
_EXTRA_LINES = [
    "def main():\n    print('hello, world')\n    return 0\n", "for i in range(10):\n\tx += i * 2\n",
    "Numbers: 1 12 123 1234 12345 3.14 2024-05-17", "Café naïve résumé façade Ångström", "日本語 中文 한국어",
    "I'm sure you'll see they've done it. DON'T!", "emoji 👍 🦙 here", "مرحبا שלום Привет", "a\r\nb\n\nc",
]


def _train(folder: Path, pre, normalizer=None, specials=(), added=(), vocab_size=700, post=None,
           model_edits: dict | None = None, config: dict | None = None, generation: dict | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer.json into ``folder`` (with configs); the HF tokenizer read back."""
    hf = HFTokenizer(models.BPE())
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_corpus(300, seed=7) + _EXTRA_LINES * 5, trainer)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if post is not None:
        hf.post_processor = post(hf)
    folder.mkdir(parents=True, exist_ok=True)
    doc = json.loads(hf.to_str())
    doc["model"].update(model_edits or {})
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), "utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation), "utf-8")
    return HFTokenizer.from_file(str(folder / "tokenizer.json"))


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>", "<tool_call>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf = _train(d / "hf", pre, normalizer=normalizers.NFC(), specials=QWEN_SPECIALS, added=QWEN_ADDED,
                config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "add_prefix_space": False, "chat_template": QWEN_TEMPLATE})
    im_end, eot = hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")
    (d / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    return convert(d / "hf", d / "qwen.t"), hf, d / "qwen.t"


def test_qwen_metadata(qwen):
    tok, hf, path = qwen
    doc = sidecar(path)
    assert (doc["pre"], doc["normalizer"]) == ("qwen2", "NFC") and "ignore_merges" not in doc  # family default
    assert doc["version"] == 2  # normalizer, added_ids
    assert tok.bos_id == -1 and not tok.add_bos and tok.chat_template == QWEN_TEMPLATE
    assert list(tok.data.eos_ids) == [hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")]
    assert tok.added_ids == {hf.token_to_id(t) for t in QWEN_ADDED}
    assert tok.special_ids == {hf.token_to_id(t) for t in QWEN_SPECIALS}
    assert tok.vocab_size == hf.get_vocab_size()


QWEN_TEXTS = TEXTS + [
    "<think>\nplan</think>answer", "plain <think> in user text", "<think><think></think>", "<thin", "<|im_start|>",
    "<|im_start|>user\nCafe\u0301 <think>x</think><|im_end|>\n", "e\u0301e\u0301\u0301 o\u0308 A\u030a\u0301",
    "\u1100\u1161\u11a8 (Hangul jamo compose under NFC)", "\u212b \u2126 (singletons)", "<tool_call>{}</tool_call>",
]


@pytest.mark.parametrize("text", QWEN_TEXTS)
def test_qwen_same_ids_as_hf(qwen, text):
    tok, hf, _ = qwen
    ids = tok.encode(text, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_added_tokens_are_cut_out_of_plain_text(qwen):
    tok, hf, _ = qwen
    think = hf.token_to_id("<think>")
    ids = tok.encode("so <think> and <|im_end|>")
    assert think in ids and not set(ids) & tok.special_ids
    assert tok.encode("<think>", allow_special=False) == [think]


# Characters Python's Unicode (14.0) knows: NFC of newer ones may differ from HF's newer tables.
_assigned = st.characters(blacklist_categories=("Cs", "Cn"))


@given(text=st.one_of(texts_with(QWEN_SPECIALS + QWEN_ADDED).filter(
    lambda t: all(unicodedata.category(c) != "Cn" for c in t)), st.text(_assigned, max_size=40)))
@settings(max_examples=150, deadline=None)
def test_qwen_random_text(qwen, text):
    tok, hf, _ = qwen
    assert tok.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm")
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf = _train(d / "hf", pre, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                config={"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
                        "add_bos_token": False, "chat_template": [{"name": "tool_use", "template": "T"},
                                                                  {"name": "default", "template": "D"}]})
    return convert(d / "hf", d / "smollm.t"), hf, d / "smollm.t"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT-2 style, with ignore_merges set (not the gpt2 family's default) and a BOS template."""
    d = tmp_path_factory.mktemp("gpt2")

    def post(hf):
        eot = hf.token_to_id("<|endoftext|>")
        return processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                    processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", eot)])])

    hf = _train(d / "hf", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                specials=["<|endoftext|>"], post=post, model_edits={"ignore_merges": True},
                config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    return convert(d / "hf", d / "gpt2.t"), hf, d / "gpt2.t"


def test_smollm_and_gpt2_metadata(smollm, gpt2):
    tok, hf, path = smollm
    assert sidecar(path)["pre"] == "smollm" and tok.chat_template == "D"
    assert tok.bos_id == hf.token_to_id("<|im_start|>") and not tok.add_bos
    assert tok.eos_ids == {hf.token_to_id("<|im_end|>")}
    tok, hf, path = gpt2
    doc = sidecar(path)
    assert doc["pre"] == "gpt2" and doc["ignore_merges"] is True and doc["version"] == 2
    # add_bos_token is absent: the post-processor's template puts the BOS first, so it is added.
    assert tok.add_bos and tok.bos_id == hf.token_to_id("<|endoftext|>")
    assert tok.encode("Hello world") == hf.encode("Hello world").ids


@pytest.mark.parametrize("which", ["smollm", "gpt2"])
def test_trained_byte_level_same_ids_as_hf(request, which):
    tok, hf, _ = request.getfixturevalue(which)
    for text in TEXTS + ["<|endoftext|>x<|im_start|>", "<|im_end"]:
        ids = tok.encode(text, add_bos=False, allow_special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text


@given(text=texts_with(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
@settings(max_examples=80, deadline=None)
def test_trained_byte_level_random_text(smollm, gpt2, text):
    for tok, hf, _ in (smollm, gpt2):
        assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False).ids


# --- hand-built tokenizer.json files -----------------------------------------------------------------
def _tiny_doc(**model) -> dict:
    """Every byte, 'ab', 'abc' (no merge builds it), and a special token; GPT-2 pre-tokenizer."""
    vocab = {c: i for i, c in enumerate(gpt2_unicode_to_byte())}
    vocab.update({"ab": 256, "abc": 257})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 258, "content": "<|end|>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                            "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": ["a b"], **model},
    }


def _write_doc(folder: Path, doc, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), "utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return folder


@pytest.mark.parametrize("ignore_merges", [False, True])
@pytest.mark.parametrize("family, regex", [("gpt2", None), ("gpt2", GPT2_REGEX), ("llama3", LLAMA3_REGEX),
                                           ("qwen2", QWEN2_REGEX)])
def test_ignore_merges_follows_the_file(tmp_path, family, regex, ignore_merges):
    doc = _tiny_doc(ignore_merges=ignore_merges)
    if regex is not None:
        doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = convert(_write_doc(tmp_path / "hf", doc), tmp_path / "t.t")
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert sidecar(tmp_path / "t.t")["pre"] == family
    # Written only when it is not the family's default (true for llama3 only).
    doc = sidecar(tmp_path / "t.t")
    if ignore_merges == (family == "llama3"):
        assert "ignore_merges" not in doc and doc["version"] == 1
    else:
        assert doc["ignore_merges"] is ignore_merges and doc["version"] == 2
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text).ids
    for text in ("abc", "abc abcabc", "ab c<|end|>abc"):
        assert tok.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids
    assert tok.encode("abc") == ([257] if ignore_merges else [256, hf.token_to_id("c")])


def test_merge_pairs_as_lists_and_repeated_merges(tmp_path):
    doc = _tiny_doc(merges=[["b", "c"], ["a", "b"], ["a", "bc"], ["b", "c"]])
    doc["model"]["vocab"]["bc"] = 258
    doc["added_tokens"][0]["id"] = 259
    tok = convert(_write_doc(tmp_path / "hf", doc), tmp_path / "t.t")
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    # tokenizers keeps the last of repeated merges: 'b c' ranks after 'a b', so 'abc' is 'ab' + 'c'.
    for text in ("abc", "bcabc", "abcbc"):
        assert tok.encode(text) == hf.encode(text).ids


_ADDED_ALPHABET = ["<x>", "<y>", "<x><y>", "<x><", "<z>", "a", "b", "c", " ", "  ", "\n", "\u3000", "\x1c", "<",
                   ">", "<|end|>", "é"]


@pytest.fixture(scope="module")
def added_tokens_pair(tmp_path_factory):
    """Overlapping non-special added tokens (HF takes the longest at the leftmost position), and
    tokens that take the white space around them (lstrip/rstrip)."""
    d = tmp_path_factory.mktemp("added")
    doc = _tiny_doc()
    doc["added_tokens"][0].update(lstrip=True, rstrip=True)  # <|end|>
    for i, (content, lstrip, rstrip) in enumerate([("<x>", False, False), ("<y>", False, True),
                                                   ("<x><y>", True, False), ("<z>", True, True)], start=259):
        doc["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": lstrip,
                                    "rstrip": rstrip, "normalized": i == 260, "special": False})
    tok = convert(_write_doc(d / "hf", doc), d / "t.t")
    return tok, HFTokenizer.from_file(str(d / "hf" / "tokenizer.json"))


@given(parts=st.lists(st.sampled_from(_ADDED_ALPHABET), max_size=12))
@settings(max_examples=100, deadline=None)
def test_added_tokens_longest_first_like_hf(added_tokens_pair, parts):
    tok, hf = added_tokens_pair
    text = "".join(parts)
    assert tok.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids
    plain = tok.encode(text)
    assert 258 not in plain
    if not any(t in text for t in ("<y>", "<z>")):
        assert tok.decode(plain) == text  # (stripped white space is gone, as in HF)


def test_strip_flags_reach_the_sidecar(added_tokens_pair):
    tok, _ = added_tokens_pair
    assert (tok.data.lstrip_ids, tok.data.rstrip_ids) == ([258, 261, 262], [258, 260, 262])
    assert tok.encode("a  <z>\n b", allow_special=True) == [tok.encode("a")[0], 262, tok.encode("b")[0]]


def test_holes_and_empty_tokens_become_placeholders(tmp_path):
    doc = _tiny_doc()
    doc["model"]["vocab"].pop("abc")  # id 257 is now a hole
    doc["model"]["vocab"][""] = 259  # an empty token
    doc["added_tokens"] = []
    data = tokenizer_from_hf(_write_doc(tmp_path / "hf", doc))
    assert len(data.vocab) == 260
    assert data.vocab[257] == placeholder(257) == b"<|dllama_unused_257|>" and data.vocab[259] == placeholder(259)
    assert {257, 259} <= set(data.special_ids)
    write_tokenizer(tmp_path / "t.t", data)
    tok = Tokenizer.load(tmp_path / "t.t")
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in ("abc ab", "<|dllama_unused_257|>", ""):
        assert tok.encode(text) == hf.encode(text).ids


# --- SentencePiece (Llama 2) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_llama2_style(tmp_path_factory.mktemp("spm-train"))


@pytest.fixture(scope="module")
def sp(sp_model):
    return spm.SentencePieceProcessor(model_file=str(sp_model))


LLAMA2_CONFIG = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": True,
                 "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"}


@pytest.fixture(scope="module")
def llama2(sp_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama2")
    (d / "hf").mkdir()
    (d / "hf" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (d / "hf" / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG))
    return convert(d / "hf", d / "llama2.t")


def test_llama2_model_metadata(llama2, sp):
    assert llama2.kind == "sentencepiece" and llama2.data.add_space_prefix and llama2.add_bos
    assert (llama2.bos_id, llama2.eos_ids) == (sp.bos_id(), {sp.eos_id()})
    assert llama2.special_ids == {0, 1, 2} and llama2.chat_template.startswith("{{ bos_token }}")
    assert llama2.vocab_size == sp.get_piece_size()


@pytest.mark.parametrize("text", SPM_EDGE_CASES + TEXTS)
def test_llama2_model_same_ids_as_sentencepiece(llama2, sp, text):
    assert llama2.encode(text, add_bos=False) == sp.encode(text)
    assert llama2.encode(text) == [1] + sp.encode(text)


@given(text=st.one_of(st.text(max_size=50), tricky_text))
@settings(max_examples=100, deadline=None)
def test_llama2_model_random_text(llama2, sp, text):
    ids = llama2.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert llama2.decode(ids) == sp.decode(ids)


def test_tokenizer_model_alone_uses_its_trainer_ids(sp_model, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    data = tokenizer_from_hf(tmp_path / "hf")
    assert (data.bos_id, data.eos_ids, data.add_bos, data.chat_template) == (1, [2], True, None)


def _hf_bpe_from_sentencepiece(sp) -> HFTokenizer:
    """The BPE model (with <unk> <s> </s>) transformers' converter makes from a Llama 2 SentencePiece model."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return hf


def _hf_from_sentencepiece(sp) -> HFTokenizer:
    """A tokenizer.json as transformers' converter makes one from a Llama 2 SentencePiece model."""
    hf = _hf_bpe_from_sentencepiece(sp)
    # Phi-3's chat tokens take the white space after them.
    hf.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False, rstrip=True),
                           AddedToken("<|user|>", special=True, normalized=False, lstrip=True, rstrip=True)])
    return hf


@pytest.fixture(scope="module", params=["prepend", "always", "first", "never"])
def metaspace(request, sp, tmp_path_factory):
    """Llama 2 / Mistral style tokenizer.json: BPE with byte fallback, Prepend+Replace or Metaspace."""
    d = tmp_path_factory.mktemp(f"metaspace-{request.param}")
    hf = _hf_from_sentencepiece(sp)
    if request.param == "prepend":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=request.param, split=False)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    (d / "hf").mkdir()
    hf.save(str(d / "hf" / "tokenizer.json"))
    (d / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return convert(d / "hf", d / "t.t"), HFTokenizer.from_file(str(d / "hf" / "tokenizer.json")), request.param


METASPACE_TEXTS = SPM_EDGE_CASES + TEXTS + ["<s>Hello</s> world", "a<s>b", "<s> x", "</s>", " <s>  y",
                                            "<|user|>\nHi there<|end|>\n<|user|> x", " \n<|end|> \n "]


def test_metaspace_same_ids_as_hf(metaspace):
    tok, hf, scheme = metaspace
    assert tok.kind == "sentencepiece" and tok.data.merges
    assert tok.data.add_space_prefix == (scheme != "never")
    assert tok.add_bos and tok.bos_id == 1  # from the post-processor's template
    for text in METASPACE_TEXTS:
        assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.encode(text, allow_special=True) == hf.encode(text).ids, text


@given(text=texts_with(["<s>", "</s>", "<unk>", "<|end|>", "<|user|>", " ", "\n"]))
@settings(max_examples=40, deadline=None)
def test_metaspace_random_text(metaspace, text):
    tok, hf, _ = metaspace
    assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False).ids


def test_metaspace_scores_follow_merge_ranks(metaspace, sp):
    tok, _, _ = metaspace
    scores = list(tok.data.scores)
    assert scores[sp.piece_to_id("<0x41>")] == -1e10
    # Llama 2's merges go by the merged piece's id, so the scores fall with the id.
    merged = [i for i in range(sp.get_piece_size()) if scores[i] > -1e10]
    assert merged and all(scores[a] > scores[b] for a, b in zip(merged, merged[1:], strict=False))


def test_bad_tokenizer_json_falls_back_on_tokenizer_model(sp_model, tmp_path, capsys):
    folder = _write_doc(tmp_path / "hf", {"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}, LLAMA2_CONFIG)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    data = tokenizer_from_hf(folder)
    assert data.kind == "sentencepiece" and not data.merges and data.bos_id == 1
    out, err = capsys.readouterr()
    # One warning line, naming the file and why it was not used.
    assert out == "" and err.count("\n") == 1 and err.startswith("\u26a0\ufe0f  ")
    assert str(folder / "tokenizer.json") in err and "model type 'Unigram' is not supported" in err
    assert str(folder / "tokenizer.model") in err and "may differ" in err


def test_usable_tokenizer_json_warns_nothing(sp_model, tmp_path, capsys):
    folder = _write_doc(tmp_path / "hf", _tiny_doc())
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert tokenizer_from_hf(folder).kind == "bpe"
    assert capsys.readouterr() == ("", "")


# --- post-processing that appends a token: refused --------------------------------------------------
def _template(single: list) -> dict:
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": {}}


_A = {"Sequence": {"id": "A", "type_id": 0}}
_END = {"SpecialToken": {"id": "<|end|>", "type_id": 0}}


@pytest.mark.parametrize("post, what", [
    (_template([_A, _END]), "TemplateProcessing appends '<|end|>'"),
    (_template([_END, _A, _END]), "TemplateProcessing appends '<|end|>'"),
    ({"type": "Sequence", "processors": [{"type": "ByteLevel", "trim_offsets": False}, _template([_A, _END])]},
     "TemplateProcessing appends '<|end|>'"),
    ({"type": "RobertaProcessing", "sep": ["<|end|>", 258], "cls": ["<|end|>", 258], "trim_offsets": True,
      "add_prefix_space": False}, "RobertaProcessing appends '<|end|>'"),
    ({"type": "BertProcessing", "sep": ["<|end|>", 258], "cls": ["<|end|>", 258]}, "BertProcessing appends"),
])
def test_post_processor_appending_a_token_is_refused(tmp_path, sp_model, post, what):
    doc = _tiny_doc()
    doc["post_processor"] = post
    _write_doc(tmp_path, doc)
    message = _expect_error(tmp_path, what, tmp_path / "tokenizer.json")
    assert "never appends" in message
    # Not hidden by falling back on a tokenizer.model either.
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    _expect_error(tmp_path, what, tmp_path / "tokenizer.json")


@pytest.mark.parametrize("single", [[_END, _A], [_A], []])
def test_post_processor_prepending_only_is_fine(tmp_path, single):
    doc = _tiny_doc()
    doc["post_processor"] = _template(single)
    _write_doc(tmp_path, doc)
    assert tokenizer_from_hf(tmp_path).add_bos == (single == [_END, _A])


def test_post_processor_appending_eos_like_hf_is_refused(tmp_path):
    """The template HF writes for add_eos_token (LlamaTokenizerFast.update_post_processor)."""
    hf = HFTokenizer.from_str(json.dumps(_tiny_doc()))
    hf.post_processor = processors.TemplateProcessing(single="$A:0 <|end|>:0", special_tokens=[("<|end|>", 258)])
    assert hf.encode("ab").ids[-1] == 258
    hf.save(str(tmp_path / "tokenizer.json"))
    _expect_error(tmp_path, "appends '<|end|>' to every encoding", tmp_path / "tokenizer.json")


@pytest.mark.parametrize("model", [False, True])
def test_add_eos_token_is_refused(tmp_path, sp_model, model):
    if model:
        (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    else:
        _write_doc(tmp_path, _tiny_doc())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True}))
    _expect_error(tmp_path, "add_eos_token true (an eos token appended to every encoding) is not supported",
                  tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": False}))
    tokenizer_from_hf(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": 1}))
    _expect_error(tmp_path, "add_eos_token is not true/false", tmp_path / "tokenizer_config.json")


# --- tokenizer.model with legacy: false (transformers' LlamaTokenizer) ----------------------------------
def _llama2_folder(sp_model: Path, folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({**LLAMA2_CONFIG, **config}))
    return folder


def _hf_non_legacy(sp) -> HFTokenizer:
    """What transformers' LlamaConverter builds from the tokenizer.model with legacy=False: no normalizer,
    Metaspace(prepend_scheme="first", split=False)."""
    hf = _hf_bpe_from_sentencepiece(sp)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    return hf


LEGACY_TEXTS = SPM_EDGE_CASES + TEXTS + ["Hello <s>.", "<s>Hello</s> world", "a<s>b", "<s> x", "</s>", " <s>  y",
                                         "<s>", "<s><s>a", "x</s>\n<s>", "\u2581x <s>\u2581y"]


def test_legacy_false_is_honoured(sp_model, sp, tmp_path):
    tok = convert(_llama2_folder(sp_model, tmp_path / "hf", legacy=False), tmp_path / "t.t")
    assert tok.data.add_space_prefix and tok.data.prepend_scheme == "first"
    assert sidecar(tmp_path / "t.t")["version"] == 2  # a version 1 reader would tokenize it the legacy way
    hf = _hf_non_legacy(sp)
    for text in LEGACY_TEXTS:
        assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text).ids, text
    # transformers' own example: after a special token no space is added ('.', not ' .'), unlike legacy.
    dot = sp.piece_to_id(".")
    assert sp.encode(".") != [dot]  # SentencePiece's dummy prefix
    assert tok.encode("Hello <s>.", add_bos=False, allow_special=True) == sp.encode("Hello ") + [1, dot]
    legacy = convert(_llama2_folder(sp_model, tmp_path / "legacy"), tmp_path / "l.t")
    assert legacy.data.prepend_scheme is None and sidecar(tmp_path / "l.t")["version"] == 1
    assert legacy.encode("Hello <s>.", add_bos=False, allow_special=True) == sp.encode("Hello ") + [1] + sp.encode(".")


@pytest.fixture(scope="module")
def legacy_false(sp_model, sp, tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy-false")
    return convert(_llama2_folder(sp_model, d / "hf", legacy=False), d / "t.t"), _hf_non_legacy(sp)


@given(text=texts_with(["<s>", "</s>", "<unk>", " ", "\n", "\u2581"]))
@settings(max_examples=40, deadline=None)
def test_legacy_false_random_text(legacy_false, text):
    tok, hf = legacy_false
    assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text).ids


def test_legacy_false_without_prefix_space(sp_model, sp, tmp_path):
    tok = convert(_llama2_folder(sp_model, tmp_path / "hf", legacy=False, add_prefix_space=False), tmp_path / "t.t")
    assert not tok.data.add_space_prefix
    ids = tok.encode("Hello world", add_bos=False)
    assert not tok.piece(ids[0]).startswith(b" ") and tok.decode(ids) == "Hello world"
    hf = _hf_non_legacy(sp)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    for text in LEGACY_TEXTS:
        assert tok.encode(text, add_bos=False, allow_special=True) == hf.encode(text).ids, text


@pytest.mark.parametrize("config, fragment", [
    ({"legacy": "no"}, "legacy is not true/false"),
    ({"add_prefix_space": 0}, "add_prefix_space is not true/false"),
    ({"add_prefix_space": False}, "add_prefix_space false disagrees with"),
    ({"add_prefix_space": False, "legacy": True}, "add_prefix_space false disagrees with"),
])
def test_bad_legacy_settings(sp_model, tmp_path, config, fragment):
    folder = _llama2_folder(sp_model, tmp_path, **config)
    _expect_error(folder, fragment, folder / "tokenizer_config.json")


def test_legacy_settings_that_change_nothing(sp_model, tmp_path):
    for config in ({"legacy": True}, {"legacy": None, "add_prefix_space": None}, {"add_prefix_space": True}):
        data = tokenizer_from_hf(_llama2_folder(sp_model, tmp_path, **config))
        assert data.add_space_prefix and data.prepend_scheme is None


# --- SentencePiece protobufs made by hand -------------------------------------------------------------
def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return _pb_varint(number << 3 | 2) + _pb_varint(len(value)) + value
    if isinstance(value, float):
        return _pb_varint(number << 3 | 5) + struct.pack("<f", value)
    return _pb_varint(number << 3) + _pb_varint(value)


def _spm_proto(extra_pieces=(), model_type=2, normalizer=None, bytes_=256) -> bytes:
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(bytes_)]
    pieces += [("\u2581", -1.0, 1), ("a", -2.0, 1), ("b", -3.0, 1), ("ab", -0.5, 1), ("\u2581ab", -0.7, 1)]
    pieces += list(extra_pieces)
    out = b"".join(_pb(1, _pb(1, p.encode()) + _pb(2, s) + _pb(3, t)) for p, s, t in pieces)
    out += _pb(2, _pb(3, model_type) + _pb(41, 1) + _pb(42, 2) + _pb(43, -1))
    norm = normalizer if normalizer is not None else _pb(1, b"identity") + _pb(3, 1) + _pb(4, 0)
    return out + _pb(3, norm)


def test_hand_made_protobuf(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_spm_proto())
    data = tokenizer_from_hf(tmp_path)
    assert (data.kind, data.bos_id, data.eos_ids, data.add_space_prefix) == ("sentencepiece", 1, [2], True)
    tok = Tokenizer(data)
    # ids: 0-2 <unk> <s> </s>, 3-258 bytes, 259 '▁', 260 'a', 261 'b', 262 'ab', 263 '▁ab'
    assert tok.encode("ab ab", add_bos=False) == [263, 263]
    assert tok.encode("ba", add_bos=False) == [259, 261, 260]
    assert tok.decode(tok.encode("ab ab", add_bos=False)) == "ab ab"


# --- bad input: always one line, naming the file ------------------------------------------------------
def _expect_error(folder: Path, fragment: str, names: str | Path | None = None) -> str:
    with pytest.raises(FormatError) as e:
        tokenizer_from_hf(folder)
    message = str(e.value)
    assert "\n" not in message and fragment in message, message
    assert str(names or folder) in message, message
    return message


def _without_space_byte(doc: dict) -> None:
    """No token for the byte 0x20 ('Ġ'): 'abc' takes its id."""
    vocab = doc["model"]["vocab"]
    vocab["abc"] = vocab.pop("Ġ")
    doc["added_tokens"] = []


BAD_DOCS = [
    ("model type 'WordPiece'", lambda d: d.update(model={"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"})),
    ("model type 'Unigram'", lambda d: d.update(model={"type": "Unigram", "vocab": [["a", 0.0]]})),
    ("no 'model'", lambda d: d.pop("model")),
    ("expected a JSON object", lambda d: d.clear() or d.update(__list__=True)),
    ("dropout", lambda d: d["model"].update(dropout=0.1)),
    ("continuing_subword_prefix", lambda d: d["model"].update(continuing_subword_prefix="##")),
    ("no vocab", lambda d: d["model"].update(vocab=[["a", 0]])),
    ("share id 1", lambda d: d["model"]["vocab"].update(zz=1)),
    ("bad id", lambda d: d["model"]["vocab"].update(zz=-4)),
    ("'zz', which is not in the vocab", lambda d: d["model"].update(merges=["a zz"])),
    ("'aa', which is not in the vocab", lambda d: d["model"].update(merges=["a a"])),
    ("not two tokens", lambda d: d["model"].update(merges=["a b c"])),
    ("neither 'a b' nor [a, b]", lambda d: d["model"].update(merges=[[1, 2]])),
    ("merges are not a list", lambda d: d["model"].update(merges="a b")),
    ("pre-tokenizer Split(", lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})),
    ("pre-tokenizer Whitespace() is not supported", lambda d: d.update(pre_tokenizer={"type": "Whitespace"})),
    ("pre-tokenizer null is not supported", lambda d: d.update(pre_tokenizer=None)),
    ("add_prefix_space", lambda d: d["pre_tokenizer"].update(add_prefix_space=True)),
    ("Split(pattern={\"String\": \" \"}", lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"}, {"type": "ByteLevel",
                                                                               "add_prefix_space": False}]})),
    ("normalizer Lowercase() is not supported", lambda d: d.update(normalizer={"type": "Lowercase"})),
    ("normalizer NFC() + NFKC() is not supported", lambda d: d.update(normalizer={
        "type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "NFKC"}]})),
    ("normalized: true", lambda d: d.update(normalizer={"type": "NFC"}) or d["added_tokens"][0].update(normalized=True)),
    ("has single_word: true", lambda d: d["added_tokens"][0].update(single_word=True)),
    ("has id 300, but tokenizers gives it id 258", lambda d: d["added_tokens"][0].update(id=300)),
    ("bad added token", lambda d: d["added_tokens"][0].update(content=5)),
    ("'added_tokens' is not a list", lambda d: d.update(added_tokens={})),
    ("is not byte-level text", lambda d: d["model"]["vocab"].update({"中": d["model"]["vocab"].pop("abc")})),
    ("Metaspace with replacement", lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                                                      "prepend_scheme": "always", "split": True})),
    ("without byte_fallback", lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                                                 "prepend_scheme": "first", "split": False})),
    ("Prepend('\u2581') + Replace", lambda d: d.update(pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "_"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]})),
    ("pre-tokenizer is not a JSON object", lambda d: d.update(pre_tokenizer=["ByteLevel"])),
    ("unk token or byte fallback", lambda d: _without_space_byte(d) or d["model"].update(unk_token="a")),
    ("unk token or byte fallback", lambda d: _without_space_byte(d) or d["model"].update(byte_fallback=True)),
]


@pytest.mark.parametrize("fragment, mutate", BAD_DOCS, ids=[f for f, _ in BAD_DOCS])
def test_bad_tokenizer_json(tmp_path, fragment, mutate):
    doc = _tiny_doc()
    mutate(doc)
    if doc.pop("__list__", False):
        doc = [1, 2]
    _write_doc(tmp_path, doc)
    _expect_error(tmp_path, fragment, tmp_path / "tokenizer.json")


def test_the_tiny_document_is_good(tmp_path):
    tok = convert(_write_doc(tmp_path / "hf", _tiny_doc()), tmp_path / "t.t")
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tok.encode("ab abc<|end|>", allow_special=True) == hf.encode("ab abc<|end|>", add_special_tokens=False).ids


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000, b""])
def test_malformed_tokenizer_json(tmp_path, raw):
    (tmp_path / "tokenizer.json").write_bytes(raw)
    _expect_error(tmp_path, "not valid JSON", tmp_path / "tokenizer.json")


BAD_CONFIGS = [
    ("tokenizer_config.json", b"{oops", "not valid JSON"),
    ("tokenizer_config.json", b"[]", "expected a JSON object"),
    ("tokenizer_config.json", json.dumps({"eos_token": "<|nope|>"}).encode(), "eos_token '<|nope|>' is not a token"),
    ("tokenizer_config.json", json.dumps({"bos_token": 5}).encode(), "bos_token is neither text"),
    ("tokenizer_config.json", json.dumps({"add_bos_token": "yes"}).encode(), "add_bos_token is not true/false"),
    ("tokenizer_config.json", json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}).encode(),
     'no "default" one'),
    ("tokenizer_config.json", json.dumps({"chat_template": 7}).encode(), "chat_template is neither text"),
    ("generation_config.json", json.dumps({"eos_token_id": 100000}).encode(), "eos_token_id 100000"),
    ("generation_config.json", json.dumps({"eos_token_id": ["x"]}).encode(), "eos_token_id 'x'"),
    ("chat_template.jinja", b"\xff\xfe", "not UTF-8"),
    ("chat_template.json", json.dumps({"chat_template": 7}).encode(), "chat_template is neither text"),
]


@pytest.mark.parametrize("name, raw, fragment", BAD_CONFIGS, ids=[f for _, _, f in BAD_CONFIGS])
def test_bad_config_files(tmp_path, name, raw, fragment):
    _write_doc(tmp_path, _tiny_doc())
    (tmp_path / name).write_bytes(raw)
    _expect_error(tmp_path, fragment, tmp_path / name)


def test_missing_folder_and_files(tmp_path):
    _expect_error(tmp_path / "nope", "not a folder")
    _expect_error(tmp_path, "no tokenizer.json or tokenizer.model")
    (tmp_path / "f").write_text("x")
    _expect_error(tmp_path / "f", "not a folder")


def test_chat_template_sources(tmp_path):
    _write_doc(tmp_path, _tiny_doc(), {"chat_template": "from config", "eos_token": "<|end|>"})
    assert tokenizer_from_hf(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.jinja").write_text("from jinja file")
    data = tokenizer_from_hf(tmp_path)
    assert data.chat_template == "from jinja file" and data.eos_ids == [258] and data.bos_id == -1
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert tokenizer_from_hf(tmp_path).chat_template == "from json"


def test_generation_config_adds_eos_ids(tmp_path):
    _write_doc(tmp_path, _tiny_doc(), {"eos_token": "<|end|>"})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [97, 258, 98]}))
    assert tokenizer_from_hf(tmp_path).eos_ids == [258, 97, 98]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 97}))
    assert tokenizer_from_hf(tmp_path).eos_ids == [258, 97]


BAD_PROTOS = [
    (b"\xff" * 11, "bad protobuf varint"),
    (b"\xff\xff\xff", "truncated SentencePiece model (protobuf varint)"),
    (b"\x0a\x10abc", "truncated"),
    (b"\x0b", "wire type 3"),
    (b"", "no pieces"),
    (_pb(2, _pb(3, 2)), "no pieces"),
    (_spm_proto(model_type=1), "model type unigram is not supported"),
    (_spm_proto(extra_pieces=[("<tool>", 0.0, 4)]), "user-defined"),
    (_spm_proto(extra_pieces=[("zz", 0.0, 5)]), "unused"),
    (_spm_proto(extra_pieces=[("ab", 0.0, 1)]), "both 'ab'"),
    (_spm_proto(extra_pieces=[("", 0.0, 1)]), "is empty"),
    (_spm_proto(extra_pieces=[("<0x4G>", 0.0, 6)]), "is not <0xXX>"),
    (_spm_proto(bytes_=255), "byte fallback pieces"),
    (_spm_proto(normalizer=_pb(1, b"nmt_nfkc") + _pb(2, b"\x01\x02")), "normalization rule 'nmt_nfkc'"),
    (_spm_proto(normalizer=_pb(1, b"identity")), "remove_extra_whitespaces"),
    (_spm_proto(normalizer=_pb(4, 0) + _pb(5, 0)), "escape_whitespaces"),
    (_spm_proto() + _pb(2, 5), "bad trainer spec"),
    (_spm_proto() + _pb(1, b"\xff"), "truncated SentencePiece model"),
    (_spm_proto() + _pb(1, _pb(1, b"\xff\xfe")), "piece 264 is not UTF-8"),
]


@pytest.mark.parametrize("raw, fragment", BAD_PROTOS, ids=[f for _, f in BAD_PROTOS])
def test_bad_tokenizer_model(tmp_path, raw, fragment):
    (tmp_path / "tokenizer.model").write_bytes(raw)
    _expect_error(tmp_path, fragment, tmp_path / "tokenizer.model")


def test_both_files_bad_names_both(tmp_path):
    _write_doc(tmp_path, {"model": {"type": "WordLevel", "vocab": {}}})
    (tmp_path / "tokenizer.model").write_bytes(b"garbage!")
    message = _expect_error(tmp_path, "'WordLevel' is not supported", tmp_path / "tokenizer.json")
    assert str(tmp_path / "tokenizer.model") in message


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_MUTABLE = _spm_proto()


@given(raw=st.one_of(st.binary(max_size=300), st.builds(
    lambda pos, value, cut: _MUTABLE[:pos] + bytes([value]) + _MUTABLE[pos + 1:cut],
    st.integers(0, len(_MUTABLE) - 1), st.integers(0, 255), st.integers(0, len(_MUTABLE)))))
@settings(max_examples=150, deadline=None)
def test_random_protobufs_give_format_errors(fuzz_dir, raw):
    (fuzz_dir / "tokenizer.model").write_bytes(raw)
    try:
        data = tokenizer_from_hf(fuzz_dir)
    except FormatError as e:
        assert "\n" not in str(e)
    else:
        Tokenizer(data).encode("ab a b")


# --- the sidecar's new fields ---------------------------------------------------------------------------
def _data(**kw) -> TokenizerData:
    base = dict(vocab=[b"a", b"b", b"ab", b"<|s|>", b"<t>"], scores=[0.0, -1.0, -2.0, -3.0, -4.0], kind="bpe",
                pre="gpt2", merges=[(0, 1)], special_ids=[3])
    return TokenizerData(**{**base, **kw})


def test_sidecar_new_fields_round_trip(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data(added_ids=[4], normalizer="NFKC", ignore_merges=False, prepend_scheme="first",
                             lstrip_ids=[4], rstrip_ids=[3, 4]))
    doc = sidecar(p)
    assert (doc["added_ids"], doc["normalizer"], doc["ignore_merges"], doc["prepend_scheme"]) == ([4], "NFKC", False,
                                                                                                  "first")
    assert (doc["lstrip_ids"], doc["rstrip_ids"]) == ([4], [3, 4])
    back = read_tokenizer(p)
    assert (back.added_ids, back.normalizer, back.ignore_merges, back.prepend_scheme) == ([4], "NFKC", False, "first")
    assert (back.lstrip_ids, back.rstrip_ids) == ([4], [3, 4])
    tok = Tokenizer(back)
    assert tok.encode("a <t> b") == [0, 4, 1] and tok.encode("\u1d43b") == [2]  # NFKC: ᵃ is a
    assert tok.encode("<|s|> a", allow_special=True) == [3, 0]


def test_old_sidecars_still_load(tmp_path):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    doc = sidecar(p)
    assert not {"added_ids", "normalizer", "ignore_merges", "prepend_scheme", "lstrip_ids", "rstrip_ids"} & set(doc)
    back = read_tokenizer(p)
    assert (back.added_ids, back.normalizer, back.ignore_merges, back.prepend_scheme) == ([], None, None, None)
    assert (back.lstrip_ids, back.rstrip_ids) == ([], [])


@pytest.mark.parametrize("change, problem", [
    ({"added_ids": [9]}, "'added_ids'"),
    ({"added_ids": "4"}, "'added_ids'"),
    ({"added_ids": [3]}, "both 'special_ids' and 'added_ids'"),
    ({"normalizer": "NFX"}, "unknown normalizer 'NFX'"),
    ({"ignore_merges": "yes"}, "'ignore_merges'"),
    ({"prepend_scheme": "sometimes"}, "unknown prepend_scheme"),
    ({"lstrip_ids": [5]}, "'lstrip_ids'"),
    ({"rstrip_ids": [True]}, "'rstrip_ids'"),
])
def test_bad_new_sidecar_fields(tmp_path, change, problem):
    p = tmp_path / "w.t"
    write_tokenizer(p, _data())
    doc = {**sidecar(p), **change, "version": 2}
    sidecar_path(p).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=problem):
        read_tokenizer(p)


@pytest.mark.parametrize("change", [{"normalizer": "NFX"}, {"prepend_scheme": "x"}, {"added_ids": [3]},
                                    {"added_ids": [7]}, {"rstrip_ids": [5]}])
def test_writing_bad_new_fields_is_refused(tmp_path, change):
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path / "w.t", _data(**change))
    assert not list(tmp_path.iterdir())



@pytest.mark.parametrize("which", ["llama3", "llama2"])
def test_the_dropped_characters_warning_is_only_for_dropped_characters(which, tmp_path, capsys, request):
    """Tokenizers that add a BOS (Llama 3's BPE, Llama 2's SentencePiece) warn only when text
    was really lost, not because the BOS decodes to text of its own."""
    from dllama.commands.common import encode_text

    from dataclasses import replace

    data = tokenizer_from_hf(request.getfixturevalue(f"{which}_hf_folder"))
    write_tokenizer(tmp_path / "t.t", replace(data, add_bos=True))  # as a .t of the model would say
    tok = Tokenizer.load(tmp_path / "t.t")
    assert tok.add_bos and tok.bos_id >= 0
    for text in ("The capital of France is", " leading space", "caf\u00e9 \u4e16\u754c"):
        ids = encode_text(tok, text)
        assert ids[0] == tok.bos_id and "left out" not in capsys.readouterr().err, text
    encode_text(tok, "a\ud800b")  # a lone surrogate has no bytes, so no token: really left out
    assert "left out" in capsys.readouterr().err


def test_another_models_tokenizer_is_refused_in_one_line(llama2_hf_folder, smollm2, tmp_path):
    """Llama 2's 32000-token tokenizer with SmolLM2 (49152 rows): one line, exit 1, no text."""
    import subprocess
    import sys

    convert(llama2_hf_folder, tmp_path / "llama2.t")
    run = subprocess.run([sys.executable, "-m", "dllama", "inference", "--model", str(smollm2[0]), "--tokenizer",
                          str(tmp_path / "llama2.t"), "--prompt", "Hello", "--steps", "8"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: the tokenizer has 32000 tokens but the model's vocabulary has 49152: they do not belong together")
    assert "Traceback" not in run.stderr
