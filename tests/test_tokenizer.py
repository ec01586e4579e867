"""The tokenizer: exact ids for SmolLM2 (byte-level BPE), HF `tokenizers` as a differential oracle,
decoding and streaming, SentencePiece and legacy (.t without sidecar) paths."""
from __future__ import annotations


import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from dllama.errors import FormatError
from dllama.engine.pretokenizer import KNOWN_PRE, pre_tokenize
from dllama.engine.tokenizer import Tokenizer
from dllama.formats.gguf_tokenizer import byte_level_to_bytes, tokenizer_from_gguf
from dllama.formats.tfile import TokenizerData, sidecar_path, write_tokenizer

# Produced once with HF `tokenizers` set up like SmolLM2's tokenizer.json (BPE over the GGUF's
# vocab and merges; Digits(individual_digits=True) then ByteLevel(add_prefix_space=False)).
# Checked by hand: digits are single tokens ('0' is 32, so '1' is 33), ' ' * 4 is one token (289),
# 'Hello' 19556 + 'Ġworld' 905, "don" + "'t", and "<|im_start|>" typed as text is '<' '|' 'im' ...
EXPECTED = [
    (' ', [216]),
    ('  ', [256]),
    ('   ', [333]),
    ('    ', [289]),
    ('     ', [4444]),
    ('      ', [5013]),
    ('       ', [415]),
    ('        ', [353]),
    ('         ', [17377]),
    ('          ', [16778]),
    ('a b', [81, 278]),
    ('a  b', [81, 216, 278]),
    ('a   b', [81, 256, 278]),
    ('a    b', [81, 333, 278]),
    ('a     b', [81, 289, 278]),
    ('a      b', [81, 4444, 278]),
    ('a       b', [81, 5013, 278]),
    ('a        b', [81, 415, 278]),
    ('a         b', [81, 353, 278]),
    ('a          b', [81, 17377, 278]),
    ('  leading and trailing  ', [216, 2899, 284, 35079, 256]),
    ('\t', [197]),
    ('\t\t', [1656]),
    ('a\tb', [81, 197, 82]),
    ('\tindented\n\t\tmore', [197, 526, 6574, 3354, 197, 3143]),
    ('\n', [198]),
    ('\r\n', [2738]),
    ('\n\n\n', [16506]),
    ('line one\nline two\r\nline three\n\n\nend\n', [1311, 582, 198, 1311, 827, 201, 198, 1311, 1296, 1116, 198, 486, 198]),
    (' \n ', [3717, 216]),
    ('x \n\n y', [104, 38028, 329]),
    ('123456', [33, 34, 35, 36, 37, 38]),
    ('3.14159', [35, 30, 33, 36, 33, 37, 41]),
    ('1,000,000', [33, 28, 32, 32, 32, 28, 32, 32, 32]),
    ('Pi is 3.14159, and 1,000,000 > 999 ; 2024-05-17 12:30', [41967, 314, 216, 35, 30, 33, 36, 33, 37, 41, 28, 284, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 2986, 216, 41, 41, 41, 8544, 216, 34, 32, 34, 36, 29, 32, 37, 29, 33, 39, 216, 33, 34, 42, 35, 32]),
    ('x1y22z333', [104, 33, 105, 34, 34, 106, 35, 35, 35]),
    ('٣٤٥ ①②', [164, 113, 164, 114, 164, 115, 216, 173, 235, 250, 173, 235, 111]),
    ('def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n', [1604, 3987, 24, 94, 727, 472, 585, 304, 2067, 216, 34, 42, 448, 1003, 304, 472, 1003, 3987, 24, 94, 731, 216, 33, 25, 1232, 3987, 24, 94, 731, 216, 34, 25, 198]),
    ("class A:\n\tdef __init__(self):\n\t\tself.x = {'k': [1, 2]}  # comment\n", [2064, 330, 42, 198, 197, 1604, 2758, 2563, 3762, 771, 727, 3354, 197, 771, 30, 104, 446, 7353, 91, 1539, 933, 33, 28, 216, 34, 28852, 216, 907, 5189, 198]),
    ('#include <stdio.h>\n\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n', [19, 21745, 2067, 10491, 1119, 30, 88, 46, 198, 198, 591, 1085, 24, 32439, 25, 1662, 472, 1628, 86, 23901, 84, 76, 94, 1002, 216, 36, 34, 4258, 472, 1003, 216, 32, 43, 198, 109, 198]),
    ('for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }', [1710, 365, 591, 2056, 446, 216, 32, 43, 2056, 2067, 304, 43, 1232, 27, 89, 25, 1662, 253, 75, 89, 77, 446, 278, 75, 89, 77, 1672, 216, 34, 43, 4029]),
    ('I ❤️ 🍕!', [57, 4636, 247, 114, 31752, 15107, 231, 239, 17]),
    ('👨\u200d👩\u200d👧\u200d👦', [10813, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235, 116]),
    ('🇵🇱🇺🇸🇯🇵', [10813, 225, 130, 10813, 225, 126, 10813, 225, 135, 10813, 225, 133, 10813, 225, 124, 10813, 225, 130]),
    ('👍🏽 ok', [10813, 235, 231, 10813, 233, 138, 10907]),
    ('🏳️\u200d🌈', [10813, 233, 128, 31752, 321, 231, 10813, 230, 226]),
    ('你好，世界！', [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219]),
    ('日本語のテキストです。', [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 7365, 117, 39958, 19076]),
    ('한국어 문장입니다', [33085, 246, 181, 130, 251, 183, 240, 129, 25947, 122, 133, 183, 248, 115, 183, 248, 223, 41259, 226, 41259, 114]),
    ('مرحبا بالعالم', [21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706]),
    ('שלום עולם', [38229, 31838, 23970, 162, 247, 12960, 112, 23970, 31838, 162, 247]),
    ('Привет, мир!', [155, 249, 46879, 16464, 32547, 28, 41337, 7872, 9175, 17]),
    ('नमस्ते दुनिया', [30658, 35090, 38770, 16525, 26293, 30581, 12335, 116, 42990, 30658, 27011, 32932, 18075]),
    ('Γειά σου Κόσμε', [153, 237, 14240, 12001, 26112, 32437, 39963, 5664, 244, 36180, 18751, 16674, 14240]),
    ('Café naïve résumé Ångström Łódź façade', [51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 5549, 223, 863, 1321, 45682, 18811, 219, 7342, 84, 144, 135, 40852]),
    ('é (combining) vs é', [85, 151, 219, 365, 14558, 1294, 25, 6375, 26411]),
    ("don't", [12420, 982]),
    ("I'M", [57, 23, 61]),
    ("they'll", [11518, 3060]),
    ("We've it's she'd you're I'd", [1882, 3543, 357, 506, 1041, 6737, 346, 2316, 339, 6737]),
    ("DON'T STOP 'TIL", [52, 2154, 23, 68, 5022, 7627, 637, 68, 4192]),
    ('<|im_start|>user', [44, 108, 306, 79, 3738, 108, 46, 4093]),
    ('<|im_start|>user\nHi<|im_end|>\n', [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108, 306, 79, 486, 108, 46, 198]),
    ('<|endoftext|>', [44, 108, 486, 1714, 2692, 108, 46]),
    ('<repo_name>dllama<file_sep>', [44, 22139, 79, 1245, 46, 84, 764, 4232, 44, 2153, 79, 29070, 46]),
    ('a\xa0b', [81, 15442, 82]),
    ('a\u3000b', [81, 12109, 218, 82]),
    ('x\u2003\u2003y', [104, 321, 221, 321, 221, 105]),
    ('a\u2028b', [81, 321, 118, 82]),
    ('a\x1cb\x1fc', [81, 213, 82, 215, 83]),
    ('\u200bzero\u200dwidth', [321, 229, 13723, 321, 231, 6930]),
    ('Hello world', [19556, 905]),
    ('Hello, World! How are you?', [19556, 28, 2260, 17, 1073, 359, 346, 47]),]

# Control bytes that have no token in SmolLM2's vocabulary: HF drops them, and so do we. Lead
# bytes F1 and F2 have none either, so planes 4-11 (all unassigned) cannot be encoded.
UNENCODABLE = "\x04\x06\x13\x14\x16\x1d"
encodable = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=UNENCODABLE)
                    .filter(lambda c: not 0x40000 <= ord(c) < 0xC0000))
# Characters where pre-tokenizers tend to disagree: white space Python and Unicode see differently,
# contractions, digits of other scripts, letters and digits newer than Python 3.11's Unicode 14.
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u3000\u200b\u200d'sdtmlrevSDTMLV"
              "0123456789٣①½aZéß日한👍\U0001F3FD\U0001F1F5.,!?<|>_-#$+=^~\u00ad\u0301") + [
    "\U00031350", "\U00011F04", "\U00016FF4", "\U00011DE0", "\U0001E5F1", "\U00011B00", "\u1c89", "\U000E0001"]
texts = st.one_of(st.text(max_size=80), st.text(alphabet=st.sampled_from(TRICKY), max_size=60))


@pytest.fixture(scope="module")
def reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def data(reader) -> TokenizerData:
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def tok(data) -> Tokenizer:
    return Tokenizer(data)


def _hf_smollm2(reader, specials: bool) -> HFTokenizer:
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                                unk_token=None, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    if specials:
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in range(17)])
    return hf


@pytest.fixture(scope="module")
def hf(reader) -> HFTokenizer:
    return _hf_smollm2(reader, specials=False)


@pytest.fixture(scope="module")
def hf_special(reader) -> HFTokenizer:
    return _hf_smollm2(reader, specials=True)


# --- SmolLM2 -----------------------------------------------------------------------------------
def test_gguf_import(data):
    assert (data.kind, data.pre, data.bos_id, data.eos_ids, data.add_bos) == ("bpe", "smollm", 1, [2], False)
    assert len(data.vocab) == 49152 and len(data.merges) == 48900
    assert data.special_ids == list(range(17))
    assert data.vocab[:3] == [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    assert data.vocab[216] == b" " and data.vocab[198] == b"\n"  # 'Ġ' and 'Ċ' mapped back to bytes
    assert list(data.scores[:3]) == [0.0, -1.0, -2.0]
    assert "<|im_start|>" in data.chat_template


def test_byte_level_mapping():
    assert byte_level_to_bytes("ĠhelloĊ") == b" hello\n"
    assert byte_level_to_bytes("ðŁĳį") == "👍".encode()


@pytest.mark.parametrize("text, ids", EXPECTED, ids=[repr(t)[:40] for t, _ in EXPECTED])
def test_smollm2_exact_ids(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_special_tokens_allowed(tok):
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n", allow_special=True) == [1, 4093, 198, 26843, 2, 198]
    chat = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tok.encode(chat, allow_special=True) == [
        1, 9690, 198, 2683, 359, 5356, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520,
        9531, 198]
    assert tok.encode("<repo_name><reponame>", allow_special=True) == [3, 4]


def test_plain_text_never_gives_special_ids(tok):
    ids = tok.encode("<|im_start|>user<|im_end|><|endoftext|><repo_name>")
    assert not set(ids) & set(range(17))


def test_bos_and_properties(tok):
    assert tok.encode("Hi", add_bos=True) == [1, 26843]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [1]
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (49152, 1, {2}, False)
    assert tok.is_eos(2) and not tok.is_eos(0)
    assert tok.piece(216) == b" " and tok.special_id("<|im_end|>") == 2
    with pytest.raises(ValueError):
        tok.piece(49152)


@given(text=texts)
@settings(max_examples=300, deadline=None)
def test_same_ids_as_hf_tokenizers(tok, hf, text):
    assert tok.encode(text) == hf.encode(text).ids


@given(parts=st.lists(st.one_of(texts, st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                                       "<repo_name>", "<reponame>", "<|im_", "|>"])),
                      max_size=6))
@settings(max_examples=100, deadline=None)
def test_same_ids_as_hf_with_special_tokens(tok, hf_special, parts):
    text = "".join(parts)
    assert tok.encode(text, allow_special=True) == hf_special.encode(text).ids


def test_unencodable_control_bytes_are_dropped_like_hf(tok, hf):
    for ch in UNENCODABLE + "\U00040000\U000BFFFF":
        text = f"a{ch}b {ch}"
        assert tok.encode(text) == hf.encode(text).ids


@given(text=encodable)
@settings(max_examples=200, deadline=None)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@given(text=encodable)
@settings(max_examples=150, deadline=None)
def test_stream_matches_decode_and_never_breaks_a_character(tok, text):
    stream = tok.stream()
    chunks = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(chunks) == text
    # no chunk ends in a broken character: every U+FFFD printed is one the text holds
    assert sum(c.count("\ufffd") for c in chunks) == text.count("\ufffd")


def test_stream_holds_back_a_split_emoji(tok):
    ids = tok.encode("👍!")
    assert len(ids) > 2  # the emoji's 4 bytes are spread over several tokens
    stream = tok.stream()
    out = [stream.push(i) for i in ids]
    assert out[:-2] == [""] * (len(ids) - 2) and out[-2:] == ["👍", "!"]
    assert stream.flush() == ""


@given(ids=st.lists(st.integers(0, 49151), max_size=12))
@settings(max_examples=150, deadline=None)
def test_stream_of_any_ids_equals_decode(tok, ids):
    stream = tok.stream()
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tok.decode(ids)


def test_lone_surrogates(tok):
    # Undecodable input bytes (surrogateescape, as in sys.argv) are encoded as those bytes.
    assert tok.encode("a\udce9b") == tok.encode("a") + [tok.data.vocab.index(b"\xe9")] + tok.encode("b")
    assert tok.decode(tok.encode("a\udce9b")) == "a\ufffdb"
    assert tok.encode("x\ud800") == tok.encode("x\ufffd")


def test_invalid_utf8_becomes_replacement_characters(tok):
    broken = [10813, 33]  # the first two bytes of a 4-byte emoji, then '1'
    assert tok.decode(broken) == "\ufffd1"
    stream = tok.stream()
    assert stream.push(10813) == "" and stream.flush() == "\ufffd"
    assert stream.push(33) == "1"  # flush starts afresh


def test_t_file_and_sidecar_give_the_same_tokenizer(tmp_path, data, tok):
    path = tmp_path / "smollm2.t"
    write_tokenizer(path, data)
    loaded = Tokenizer.load(path)
    text = "def f(x):\n    return x ** 2  # 3.14 ✓ 日本\n\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode("<|im_start|>a", allow_special=True) == [1, 81]
    assert loaded.chat_template == data.chat_template
    # Without its sidecar the same .t still loads, tokenized like distributed-llama does.
    sidecar_path(path).unlink()
    legacy = Tokenizer.load(path)
    assert legacy.kind == "legacy" and not legacy.add_bos  # header key 10 keeps add_bos
    ids = legacy.encode("Hello world, 123!", add_bos=False)
    assert legacy.decode(ids) == "Hello world, 123!" and not set(ids) & set(range(17))


def test_unknown_pre_tokenizer_is_a_format_error(data):
    bad = TokenizerData(**{**data.__dict__, "pre": "klingon"})
    with pytest.raises(FormatError, match="klingon.*known: .*smollm"):
        Tokenizer(bad)


# --- Pre-tokenizer families against HF's regex engine ------------------------------------------------
_ONIG_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_ONIG_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


HF_PRE = {
    "gpt2": _split(_ONIG_GPT2),
    "llama-bpe": _split(_ONIG_LLAMA3),
    "qwen2": _split(_ONIG_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _split(_ONIG_GPT2)]),
    "default": pre_tokenizers.Sequence([
        _split(r"[\p{P}\$\+<=>\^~\|]+"), _split(_ONIG_GPT2.removesuffix(r"|\s+")), _split(r"\p{N}+"),
        _split(r"[0-9][0-9][0-9]")]),
}


@pytest.mark.parametrize("pre", sorted(HF_PRE))
@given(text=texts)
@settings(max_examples=120, deadline=None)
def test_pre_tokenizer_matches_hf_regex(pre, text):
    assert pre_tokenize(text, pre) == [piece for piece, _ in HF_PRE[pre].pre_tokenize_str(text)]


def test_known_pre_tokenizers():
    for name in ("gpt2", "smollm", "llama-bpe", "llama3", "qwen2", "starcoder", "refact", "codeshell", "default"):
        assert name in KNOWN_PRE
    assert pre_tokenize("Hello  123 wörld\n\n", "llama3") == ["Hello", " ", " ", "123", " wörld", "\n\n"]
    assert pre_tokenize("12345", "llama3") == ["123", "45"]
    assert pre_tokenize("a\x1cb", "gpt2") == ["a", "\x1c", "b"]  # \x1c is not white space


def test_llama3_ignore_merges_takes_whole_word_tokens():
    # 'abc' is a token but no merge builds it: llama3 (HF ignore_merges) still emits it whole.
    vocab = [b"a", b"b", b"c", b"ab", b"abc"]
    data = TokenizerData(vocab=vocab, scores=[0.0] * 5, kind="bpe", pre="llama3", merges=[(0, 1)])
    assert Tokenizer(data).encode("abc") == [4]
    assert Tokenizer(TokenizerData(**{**data.__dict__, "pre": "gpt2"})).encode("abc") == [3, 2]


# --- SentencePiece (Llama 2 style) -------------------------------------------------------------------
def _spm(add_space_prefix: bool = True) -> Tokenizer:
    vocab = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    scores = [0.0] * len(vocab)
    for text, score in [(" ", -100.0), ("a", -101.0), ("b", -102.0), ("c", -103.0), (" a", -5.0), ("ab", -2.0),
                        ("bc", -1.0), ("abc", -4.0), (" ab", -3.0), ("aa", -2.5)]:
        vocab.append(text.encode())
        scores.append(score)
    # ids: ' ' 259, a 260, b 261, c 262, ' a' 263, ab 264, bc 265, abc 266, ' ab' 267, aa 268
    return Tokenizer(TokenizerData(vocab=vocab, scores=scores, bos_id=1, eos_ids=[2], add_bos=True,
                                   kind="sentencepiece", special_ids=[0, 1, 2], add_space_prefix=add_space_prefix))


def test_sentencepiece_merges_by_score():
    spm = _spm()
    # ' abc': 'bc' (-1) beats 'ab' (-2) and ' a' (-5); then 'abc' (-4); ' abc' is not a token.
    # Merging left to right instead would give ' ab' + 'c'.
    assert spm.encode("abc") == [1, 259, 266]
    assert spm.decode([259, 266]) == "abc"  # the prefix space is dropped at the start
    assert spm.decode([1, 259, 266]) == "<s> abc"  # after BOS it is kept, like HF's LlamaTokenizer


def test_sentencepiece_byte_fallback_and_ties():
    spm = _spm()
    # '€' is not in the vocabulary: its UTF-8 bytes E2 82 AC become <0xE2> <0x82> <0xAC> (id = 3 + byte).
    assert spm.encode("a€", add_bos=False) == [263, 3 + 0xE2, 3 + 0x82, 3 + 0xAC]
    assert spm.decode([263, 3 + 0xE2, 3 + 0x82, 3 + 0xAC]) == "a€"
    # Equal scores: the leftmost pair merges first.
    assert _spm(add_space_prefix=False).encode("aaa", add_bos=False) == [268, 260]


def test_sentencepiece_specials():
    spm = _spm()
    assert 1 not in spm.encode("<s>", add_bos=False)
    # llama.cpp puts the prefix space at the start and after each special token.
    assert spm.encode("<s>ab</s>", add_bos=False, allow_special=True) == [1, 267, 2]
    assert spm.encode("ab</s>c", add_bos=False, allow_special=True) == [267, 2, 259, 262]


# --- legacy .t (no sidecar): distributed-llama's tokenization --------------------------------------
LEGACY_VOCAB = [b"<unk>", b"<|im_start|>", b"<|im_end|>", b"<s>", b"<", b"s", b">", b"<s", b"|", b"a", b"b",
                b"ab", b"c", b"bc", b"abc", b"i", b"m", b"_", b"t", b"r", b" "]


def _legacy() -> Tokenizer:
    return Tokenizer(TokenizerData(vocab=LEGACY_VOCAB, scores=[-float(i) for i in range(len(LEGACY_VOCAB))],
                                   bos_id=1, eos_ids=[2], add_bos=True, kind="legacy"))


def test_legacy_merges_by_score():
    legacy = _legacy()
    assert legacy.encode("abc") == [1, 14]  # 'ab' (-11) before 'bc' (-13), then 'abc'
    assert legacy.encode("c ab", add_bos=False) == [12, 20, 11]


def test_legacy_special_tokens_are_found_by_their_text_not_by_id():
    legacy = _legacy()
    # '<s>' (id 3) sits above bos but '<unk>' (0) below it: both are special all the same.
    assert legacy.special_ids == {0, 1, 2, 3}
    assert legacy.encode("<s>", add_bos=False) == [7, 6]
    assert legacy.encode("<|im_start|>ab<s>", add_bos=False, allow_special=True) == [1, 11, 3]
    plain = legacy.encode("<|im_start|>", add_bos=False)
    assert 1 not in plain and legacy.decode(plain) == "<|im_start|>"
    assert legacy.encode("é", add_bos=False) == [0]  # no byte tokens: one unk per unknown character
