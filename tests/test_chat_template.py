"""Chat templates rendered like transformers' apply_chat_template."""
from __future__ import annotations

import json
from datetime import datetime
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama.engine.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    end_of_turn_ids,
    template_for,
)
from dllama.errors import DllamaError

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there!"}]
GEN = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol():
    from dllama.default_model import ensure_default_model
    from dllama.engine.tokenizer import Tokenizer

    return Tokenizer.load(ensure_default_model()[1])


def render(source: str, messages=None, **kwargs) -> str:
    return ChatTemplate(source).render(CHAT if messages is None else messages, **kwargs)


# --- the real SmolLM2 template --------------------------------------------------------
def test_smollm2_system_and_user(smol):
    out = template_for(smol).render(CHAT)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nHi there!<|im_end|>\n"
                   "<|im_start|>assistant\n")
    no_prompt = template_for(smol).render(CHAT, add_generation_prompt=False)
    assert no_prompt == out[:-len(GEN)]


def test_smollm2_default_system_prompt(smol):
    assert SMOL_SYSTEM in smol.chat_template
    out = template_for(smol).render([{"role": "user", "content": "Hi"}])
    assert out == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n" + GEN)


def test_smollm2_multi_turn_and_content_parts(smol):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "user", "content": parts},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "é 漢字"}]
    out = template_for(smol).render(messages)
    assert out.endswith("<|im_start|>user\na\nb<|im_end|>\n"
                        "<|im_start|>assistant\nok<|im_end|>\n"
                        "<|im_start|>user\né 漢字<|im_end|>\n" + GEN)
    assert messages[0]["content"] is parts  # the caller's messages are left alone


def test_smollm2_rendered_prompt_encodes_specials(smol):
    prompt = template_for(smol).render(CHAT)
    ids = smol.encode(prompt, allow_special=True)
    start, end = smol.special_id("<|im_start|>"), smol.special_id("<|im_end|>")
    assert start is not None and end is not None
    assert ids[0] == start
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert smol.decode(ids) == prompt


def test_smollm2_bos_and_eos_tokens(smol):
    template = template_for(smol)
    assert template.bos_token == "<|im_start|>"
    assert template.eos_token == "<|im_end|>"


def test_end_of_turn_ids_smollm2(smol):
    ids = end_of_turn_ids(smol)
    assert smol.special_id("<|im_end|>") in ids
    assert smol.eos_ids <= ids
    assert smol.special_id("<|endoftext|>") in ids
    assert smol.special_id("<|im_start|>") not in ids


def test_template_for_override_file(smol, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}"
                    "[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}")
    assert (template_for(smol, str(path)).render(CHAT)
            == "<|im_start|>[system]Be brief.[user]Hi there!<|im_end|>")


# --- template_for / end_of_turn_ids with a stand-in tokenizer -------------------------
class FakeTokenizer:
    def __init__(self, template, pieces, bos_id, eos_ids, specials):
        self.chat_template = template
        self._pieces = pieces
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self._specials = specials

    def piece(self, token_id):
        return self._pieces[token_id]

    def special_id(self, text):
        return self._specials.get(text)


def llama3_like(template=None):
    pieces = [b"<|begin_of_text|>", b"<|end_of_text|>", b"<|eot_id|>", b"hello"]
    specials = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2}
    return FakeTokenizer(template, pieces, 0, [1], specials)


def test_template_for_without_template_names_the_flag():
    with pytest.raises(ChatTemplateError, match="--chat-template FILE") as info:
        template_for(llama3_like(None))
    assert isinstance(info.value, DllamaError)
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        template_for(llama3_like(""))


def test_template_for_override_without_own_template(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{{ bos_token }}{{ messages[-1]['content'] }}{{ eos_token }}",
                    encoding="utf-8")
    out = template_for(llama3_like(None), path).render(CHAT)
    assert out == "<|begin_of_text|>Hi there!<|end_of_text|>"
    # the override wins over the tokenizer's own template
    out = template_for(llama3_like("OWN"), str(path)).render(CHAT)
    assert out.startswith("<|begin_of_text|>Hi")
    assert template_for(llama3_like("OWN")).render(CHAT) == "OWN"


def test_template_for_no_bos():
    tok = FakeTokenizer("[{{ bos_token }}|{{ eos_token }}]", [b"</s>"], -1, [0],
                        {"</s>": 0})
    assert template_for(tok).render(CHAT) == "[|</s>]"


def test_template_for_needs_only_a_few_attributes():
    tok = SimpleNamespace(chat_template="{{ eos_token }}", bos_id=-1,
                          eos_ids=frozenset({1, 0}),
                          piece=lambda i: [b"<a>", b"<b>"][i])
    assert template_for(tok).render(CHAT) == "<a>"


def test_end_of_turn_ids_fake():
    assert end_of_turn_ids(llama3_like()) == frozenset({1, 2})
    assert end_of_turn_ids(FakeTokenizer(None, [], -1, [], {})) == frozenset()


def test_from_file_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="nope.jinja"):
        ChatTemplate.from_file(tmp_path / "nope.jinja")
    with pytest.raises(ChatTemplateError, match="cannot read"):
        ChatTemplate.from_file(tmp_path)  # a directory
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ChatTemplateError, match="bad.jinja"):
        ChatTemplate.from_file(bad)
    broken = tmp_path / "broken.jinja"
    broken.write_text("ok\n{% if %}")
    with pytest.raises(ChatTemplateError, match=r"broken\.jinja.*line 2"):
        ChatTemplate.from_file(broken)


def test_from_file_tokenizer_config_json(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    config = {"add_bos_token": False, "chat_template": "{{ messages|length }}"}
    path.write_text(json.dumps(config))
    assert ChatTemplate.from_file(path).render(CHAT) == "2"
    named = [{"name": "tool_use", "template": "T"},
             {"name": "default", "template": "D"}]
    path.write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.from_file(path).render(CHAT) == "D"
    path.write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json.*chat_template"):
        ChatTemplate.from_file(path)


# --- jinja semantics (transformers' environment) --------------------------------------
def test_raise_exception():
    source = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('Conversations must start with user') }}"
              "{% endif %}ok")
    with pytest.raises(ChatTemplateError) as info:
        render(source)
    assert str(info.value) == "chat template: Conversations must start with user"
    assert render(source, [{"role": "user", "content": "x"}]) == "ok"


def test_strftime_now():
    before = datetime.now().strftime("%d %b %Y")
    out = render("{{ strftime_now('%d %b %Y') }}")
    assert out in {before, datetime.now().strftime("%d %b %Y")}  # local time


def test_tojson_like_transformers():
    value = {"name": "météo", "tags": ["<b>", "&"], "b": 1, "a": None}

    def dumps(**kw):
        return json.dumps(value, ensure_ascii=False, **kw)

    assert render("{{ x | tojson }}", x=value) == dumps()
    assert "météo" in render("{{ x | tojson }}", x=value)  # not \u00e9
    assert "<b>" in render("{{ x | tojson }}", x=value)  # not HTML-escaped
    assert render("{{ x | tojson(indent=4) }}", x=value) == dumps(indent=4)
    assert render("{{ x | tojson(sort_keys=true) }}", x=value) == dumps(sort_keys=True)
    out = render("{{ x | tojson(separators=(',', ':')) }}", x=value)
    assert out == dumps(separators=(",", ":"))


def test_loop_controls():
    source = ("{% for m in messages %}"
              "{% if m.role == 'system' %}{% continue %}{% endif %}"
              "{{ m.content }}{% break %}{% endfor %}")
    assert render(source, CHAT + [{"role": "user", "content": "later"}]) == "Hi there!"


def test_trim_and_lstrip_blocks():
    source = ("{% for m in messages %}\n"
              "    {% if m.role == 'user' %}\n"
              "{{ m.content }}\n"
              "    {% endif %}\n"
              "{% endfor %}\n")
    assert render(source) == "Hi there!\n"


def test_generation_block_is_rendered():
    source = "{% generation %}{{ messages[1].content }}{% endgeneration %}"
    assert render(source) == "Hi there!"


LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{%- if tools is not none %}{{ raise_exception('no tools here') }}{% endif %}
{{- '|' + date_string }}"""


def test_llama3_style_template():
    template = ChatTemplate(LLAMA3_STYLE, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>")
    turns = ("<|begin_of_text|>"
             "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>")
    opening = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert template.render(CHAT) == turns + opening + "|26 Jul 2024"
    out = template.render(CHAT, date_string="1 Jan 2025")
    assert out == turns + opening + "|1 Jan 2025"
    out = template.render(CHAT, add_generation_prompt=False)
    assert out == turns + "|26 Jul 2024"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        template.render(CHAT, tools=[{"type": "function"}])


def test_variables_and_lenient_undefined():
    out = render("[{{ nothing }}][{{ tools }}][{{ documents }}][{{ bos_token }}]")
    assert out == "[][None][None][]"
    assert render("{% if custom is defined %}yes{% else %}no{% endif %}") == "no"
    assert render("{{ custom }}", custom="given") == "given"
    assert render("{{ add_generation_prompt }}", add_generation_prompt=0) == "False"


def test_tool_call_message_with_null_content():
    call = {"type": "function",
            "function": {"name": "w", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "12C"}]
    source = ("{% for m in messages %}{% if m.content is none %}"
              "{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}"
              "{% endif %};{% endfor %}")
    expected = 'weather?;{"name": "w", "arguments": {"city": "Oslo"}};12C;'
    assert render(source, messages) == expected
    messages[1].pop("content")
    assert render(source, messages) == expected


# --- errors: always one ChatTemplateError line ----------------------------------------
@pytest.mark.parametrize("source, line", [
    ("{% for m in messages %}", 1),
    ("a\n{% if %}", 2),
    ("{{ x | no_such_filter }}", 1),
    ("{% endfor %}", 1),
    ("{{ 'unclosed }}", 1),
])
def test_syntax_error(source, line):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source)
    message = str(info.value)
    assert message.startswith("chat template: ")
    assert message.endswith(f"(line {line})")
    assert "\n" not in message


def test_not_text_source():
    with pytest.raises(ChatTemplateError):
        ChatTemplate(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", [
    "line one\n{{ messages[0]['content'] + 1 }}",  # TypeError
    "{{ 1 / 0 }}",  # ZeroDivisionError
    "{{ missing.attribute }}",  # UndefinedError
    "{{ missing.attribute.deeper }}",
    "{{ messages[10]['content'] | upper + 'x' }}",
    "{% for i in range(10 ** 9) %}{% endfor %}",  # the sandbox's range limit
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError
    "{{ messages[0]['content'] | tojson(indent='bad', separators=1) }}",
    "{{ raise_exception() }}",  # missing argument
])
def test_runtime_error(source):
    with pytest.raises(ChatTemplateError) as info:
        render(source)
    message = str(info.value)
    assert message.startswith("chat template: ")
    assert "\n" not in message and "Traceback" not in message


def test_runtime_error_reports_the_line():
    with pytest.raises(ChatTemplateError, match=r"ZeroDivisionError.*\(line 3\)"):
        render("a\nb\n{{ 1 / 0 }}")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}{{ messages.append(1) }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{% set x = messages.pop() %}",
])
def test_sandbox(source):
    messages = [dict(m) for m in CHAT]
    try:
        out = render(source, messages)
    except ChatTemplateError as e:
        assert "\n" not in str(e)
    else:
        assert "class" not in out and "module" not in out and "function" not in out
    assert messages == CHAT  # the caller's messages are never changed


def test_sandbox_unsafe_access_is_a_security_error():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render("{{ ''.__class__.__mro__ }}")


TWO_OK = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]


@pytest.mark.parametrize("messages, match", [
    ("hello", r"messages must be a list"),
    (None, r"messages must be a list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"content": "x"}], r"messages\[0\]\.role must be"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\.role must be"),
    (TWO_OK[:1] + [{"role": "user"}], r"messages\[1\] has no content"),
    (TWO_OK + [{"role": "user", "content": 5}], r"messages\[2\]\.content must be"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a str"),
    ([{"role": "assistant", "content": None}], r"messages\[0\]\.content must be a str"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\]: only text parts"),
    ([{"role": "user", "content": ["text"]}], r"messages\[0\]\.content\[0\] must be"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}],
     r"messages\[0\]\.content\[0\]\.text must be a string"),
])
def test_malformed_messages(messages, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        ChatTemplate("{{ messages }}").render(messages)
    assert "\n" not in str(info.value)


# --- conformance: transformers' own apply_chat_template --------------------------------
# The expected strings above are written by hand; here transformers itself renders the same
# templates (it needs only `tokenizers`, no torch; imported once, in the fixture). Content
# parts are left out: dllama joins text parts with newlines, as llama.cpp does, where
# transformers hands the list to the template.
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Météo <now>",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
TOOL_CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}


@pytest.fixture(scope="module")
def hf_tokenizer(llama2_hf_folder):
    """transformers' PreTrainedTokenizerFast on a real tokenizer.json, with the BOS and EOS
    tokens a template is given ("" for none), one per pair."""
    from transformers import PreTrainedTokenizerFast

    made = {}

    def make(bos: str, eos: str):
        if (bos, eos) not in made:
            made[bos, eos] = PreTrainedTokenizerFast(tokenizer_file=str(llama2_hf_folder / "tokenizer.json"),
                                                     bos_token=bos or None, eos_token=eos or None)
        return made[bos, eos]

    return make


def rendered_by_both(hf, ours: ChatTemplate, messages, own_template: bool = False, **kwargs) -> tuple:
    """(transformers' text, ours) for the same messages and variables; None on a side whose
    rendering failed (transformers' exception is kept in place of its text when the template
    called raise_exception, to compare messages). ``own_template``: transformers uses the
    template its tokenizer was loaded with, else ``ours.source``."""
    import jinja2

    try:
        theirs = hf.apply_chat_template(messages, tokenize=False, **kwargs,
                                        **({} if own_template else {"chat_template": ours.source}))
    except Exception as e:  # noqa: BLE001 - any failure of the reference is a refusal
        theirs = e if type(e) is jinja2.TemplateError else None
    try:
        text = ours.render(messages, **kwargs)
    except ChatTemplateError as e:
        if isinstance(theirs, Exception):  # raise_exception: the template's own message, as ours
            assert str(e) == f"chat template: {theirs}"
            theirs = None
        text = None
    return theirs, text


CONFORMANCE = {  # name: (template, bos, eos, variables)
    "llama3-style": (LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>", {}),
    "llama3-style-date": (LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>", {"date_string": "1 Jan 2025"}),
    "llama3-style-tools": (LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>", {"tools": TOOLS}),  # raises
    "loop-controls": ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                      "{{ m.content }}{% break %}{% endfor %}", "", "", {}),
    "trim-lstrip-blocks": ("{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n"
                           "{% endfor %}\n", "", "", {}),
    "generation-block": ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                         "{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}", "", "", {}),
    "tojson": ("{{ x | tojson }}|{{ x | tojson(indent=4) }}|{{ x | tojson(sort_keys=true) }}|"
               "{{ x | tojson(separators=(',', ':')) }}|{{ messages | tojson }}", "", "",
               {"x": {"name": "météo", "tags": ["<b>", "&"], "b": 1, "a": None}}),
    "tools-tojson": ("{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ messages[-1].content }}", "", "",
                     {"tools": TOOLS}),
    "lenient-variables": ("[{{ nothing }}][{{ tools }}][{{ documents }}][{{ bos_token }}][{{ eos_token }}]"
                          "{% if custom is defined %}{{ custom }}{% else %}no{% endif %}", "", "</s>", {}),
    "custom-variable": ("{% if custom is defined %}{{ custom }}{% else %}no{% endif %}", "", "", {"custom": "given"}),
    "raise-exception": ("{% if messages[0]['role'] != 'user' %}"
                        "{{ raise_exception('Conversations must start with user') }}{% endif %}ok", "", "", {}),
    "bos-eos": ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}",
                "<s>", "</s>", {}),
    "whitespace-control": ("{%- for m in messages -%}\n  {{- m.content | trim -}}\n  {{ '|' }}\n{%- endfor %}", "", "",
                           {}),
    "tool-calls": ("{% for m in messages %}{% if m.tool_calls is defined %}"
                   "{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}{% endif %};{% endfor %}",
                   "", "", {}),
}
CONVERSATIONS = [
    CHAT,
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "ok\n"},
     {"role": "user", "content": "é 漢字 {{ not jinja }}"}],
    [{"role": "assistant", "content": "first"}, {"role": "system", "content": "late system"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
     {"role": "tool", "content": "12C"}],
]


@pytest.mark.parametrize("name", list(CONFORMANCE))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers_does(hf_tokenizer, name, conversation, add_generation_prompt):
    source, bos, eos, variables = CONFORMANCE[name]
    ours = ChatTemplate(source, bos_token=bos, eos_token=eos)
    theirs, text = rendered_by_both(hf_tokenizer(bos, eos), ours, CONVERSATIONS[conversation],
                                    add_generation_prompt=add_generation_prompt, **variables)
    assert text == theirs


def _dllama_view(data) -> SimpleNamespace:
    """What template_for reads of a tokenizer, from converted TokenizerData."""
    return SimpleNamespace(chat_template=data.chat_template, bos_id=data.bos_id, eos_ids=frozenset(data.eos_ids),
                           piece=lambda i: data.vocab[i], data=data)


@pytest.fixture(scope="module", params=["smollm2", "llama3", "qwen3"])
def real_template(request, hf_tokenizer) -> tuple:
    """(transformers' tokenizer, dllama's template, whether transformers uses its own template)
    for a real model's chat template: SmolLM2's from its GGUF (transformers gets the same
    template and special tokens), Llama 3's and Qwen3's as each loads its tokenizer folder."""
    if request.param == "smollm2":
        ours = template_for(request.getfixturevalue("smol"))
        return hf_tokenizer(ours.bos_token, ours.eos_token), ours, False
    from transformers import PreTrainedTokenizerFast

    from dllama.formats.hf_tokenizer import tokenizer_from_hf

    folder = request.getfixturevalue(f"{request.param}_hf_folder")
    ours = template_for(_dllama_view(tokenizer_from_hf(folder)))
    return PreTrainedTokenizerFast.from_pretrained(str(folder)), ours, True


def test_real_templates_render_fixed_conversations_as_transformers_does(real_template):
    hf, ours, own = real_template
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            theirs, text = rendered_by_both(hf, ours, conversation, own, add_generation_prompt=add_generation_prompt)
            assert text == theirs, conversation


tricky_text = st.text(max_size=30) | st.sampled_from([
    "", " ", "\n", "  padded  ", "<think>\nreasoning\n</think>\n\nanswer", "</think>", "<think>",
    "<tool_response>\nr\n</tool_response>", "{{ bos_token }}", "{% raw %}", "<|im_end|>", "<|eot_id|>"])


@st.composite
def conversations(draw) -> list[dict]:
    messages = []
    for _ in range(draw(st.integers(1, 6))):
        message = {"role": draw(st.sampled_from(["system", "user", "assistant", "tool"])), "content": draw(tricky_text)}
        if message["role"] == "assistant" and draw(st.integers(0, 3)) == 0:
            message["tool_calls"] = [TOOL_CALL]
        messages.append(message)
    return messages


@settings(max_examples=60, deadline=None, database=None)
@given(messages=conversations(), add_generation_prompt=st.booleans(),
       variables=st.sampled_from([{}, {"tools": TOOLS}, {"enable_thinking": False}, {"enable_thinking": True}]))
def test_real_templates_render_any_conversation_as_transformers_does(real_template, messages, add_generation_prompt,
                                                                     variables):
    hf, ours, own = real_template
    theirs, text = rendered_by_both(hf, ours, messages, own, add_generation_prompt=add_generation_prompt,
                                    **variables)
    assert text == theirs
