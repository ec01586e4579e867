"""Chat prompts from a model's Jinja chat template, rendered like Hugging Face's.

A chat model was trained on conversations laid out in one exact text format; the
template stored with its tokenizer (or given with ``--chat-template FILE``) is the only
reliable description of that format. The rendering copies transformers'
``apply_chat_template`` (``utils/chat_template_utils.py``), so that a prompt is byte for
byte what the model saw in training, without depending on transformers:

* an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks`` and the
  loop controls (``{% break %}``, ``{% continue %}``); templates are untrusted input,
  the sandbox keeps them from reaching Python internals or mutating the messages;
* the globals ``raise_exception(message)`` and ``strftime_now(format)``, a ``tojson``
  filter that keeps non-ASCII text and takes ``indent``/``separators``/``sort_keys``,
  and a no-op ``{% generation %}`` block (transformers marks assistant text with it);
* the variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
  ``tools`` and ``documents`` (None unless given) plus whatever the caller passes;
  anything else is an ordinary, lenient undefined, since templates test ``is defined``
  for optional settings.

Every failure, in the template's syntax, in its rendering or in the messages, is a
``ChatTemplateError`` with one line the CLI can print.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from types import TracebackType
from typing import Any, Mapping

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dllama.errors import DllamaError

# Special tokens that end an assistant turn in the common chat formats (ChatML, Llama 3,
# Phi-3, Gemma, GPT-2 style, SentencePiece, Llama 3 base, Llama 3.1 tool calls). A
# model's EOS is not always its end of turn (Llama 3 instruct ends turns: <|eot_id|>).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
    "<|end_of_text|>", "<|eom_id|>",
)
# The file name jinja gives a template compiled from a string, in rewritten tracebacks.
_TEMPLATE_FILENAME = "<template>"
_NO_TEMPLATE = ("this model's tokenizer has no chat template: "
                "pass one with --chat-template FILE")


class ChatTemplateError(DllamaError):
    """A chat template that cannot be compiled or rendered, or unusable messages."""


class _RaisedByTemplate(jinja2.TemplateError):
    """``raise_exception(...)`` called by the template: its message is for the user."""


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    # Local time, as transformers does: templates put today's date in system prompts.
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; tool schemas in
    # prompts must come out as transformers writes them instead.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged.

    transformers records where assistant text lies with it (for training masks); at
    inference only the text matters, but a template using the tag must still compile.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(text: str) -> str:
    """``text`` on one line (jinja's and templates' messages may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line an error came from (jinja rewrites tracebacks to show it)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(error: BaseException) -> str:
    """One line for an error raised while rendering, with its kind when that helps."""
    message = _one_line(getattr(error, "message", None) or str(error))
    if isinstance(error, jinja2.exceptions.SecurityError):
        kind = "unsafe operation"
    elif isinstance(error, jinja2.TemplateError):
        kind = ""
    else:
        kind = type(error).__name__
    if kind:
        message = f"{kind}: {message}" if message else kind
    return message or "rendering failed"


def _content_text(index: int, content: list[Any]) -> str:
    """The text of OpenAI-style content parts, joined by newlines, as llama.cpp does."""
    texts = []
    for k, part in enumerate(content):
        where = f"messages[{index}].content[{k}]"
        if not isinstance(part, Mapping):
            raise ChatTemplateError(
                f'{where} must be a {{"type": "text", "text": ...}} object')
        if part.get("type") != "text":
            raise ChatTemplateError(
                f"{where}: only text parts are supported, not {part.get('type')!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}.text must be a string")
        texts.append(text)
    return "\n".join(texts)


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Copies of ``messages`` with text contents, or an error naming the bad field.

    Templates concatenate ``message['content']`` with strings, so a wrong type would
    otherwise surface as an obscure TypeError somewhere in the template.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError('messages must be a list of {"role", "content"} '
                                f"objects, not {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f'messages[{i}] must be an object with "role" and '
                                    f'"content", not {type(message).__name__}')
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}].role must be a non-empty string")
        copy = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            pass
        elif isinstance(content, list):
            copy["content"] = _content_text(i, content)
        elif content is None and role == "assistant" and message.get("tool_calls"):
            copy["content"] = None  # an assistant turn made only of tool calls
        elif "content" not in message:
            raise ChatTemplateError(f"messages[{i}] has no content")
        else:
            raise ChatTemplateError(f"messages[{i}].content must be a string")
        out.append(copy)
    return out


def _template_in_json(source: str) -> str:
    """The ``chat_template`` of a ``tokenizer_config.json``-like text, or ``source``."""
    head = source.lstrip()
    if not head.startswith("{") or head.startswith(("{{", "{%", "{#")):
        return source  # Jinja text
    try:
        data = json.loads(source)
    except ValueError:
        return source
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):  # named: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template")
                 for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ChatTemplateError('the JSON file has no "chat_template" text')
    return template


class ChatTemplate:
    """A compiled chat template, rendered as ``apply_chat_template(tokenize=False)``."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source`` now: a broken template fails at startup, not mid-chat."""
        if not isinstance(source, str):
            raise ChatTemplateError(
                f"chat template must be text, not {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            message = f"{_one_line(e.message or str(e))} (line {e.lineno})"
            raise ChatTemplateError(f"chat template: {message}") from None
        except Exception as e:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
            raise ChatTemplateError(f"chat template: {_describe(e)}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos_token: str = "",
                  eos_token: str = "") -> "ChatTemplate":
        """The template in ``path`` (``--chat-template FILE``).

        The file holds the Jinja text; a JSON object with a ``chat_template`` (a
        ``tokenizer_config.json``) works too, as that is where Hugging Face keeps it.
        """
        name = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ChatTemplateError(
                f"cannot read chat template file {name}: {_one_line(reason)}") from None
        try:
            source = _template_in_json(source)
            return cls(source, bos_token=bos_token, eos_token=eos_token)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{name}: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt for ``messages``, ending with the assistant turn's opening when
        ``add_generation_prompt`` (so the model answers rather than continues).

        ``extra`` become template variables (``tools``, ``date_string``, ...).
        """
        context: dict[str, Any] = {
            "tools": None, "documents": None,
            "bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
            "messages": _checked_messages(messages),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**context)
        except _RaisedByTemplate as e:
            message = _one_line(e.message or "")
            raise ChatTemplateError(f"chat template: {message}") from None
        except Exception as e:  # noqa: BLE001 - any failure inside is the template's
            line = _template_line(e.__traceback__)
            where = f" (line {line})" if line is not None else ""
            raise ChatTemplateError(f"chat template: {_describe(e)}{where}") from None


def _token_text(tokenizer: Any, token_id: int) -> str:
    try:
        return tokenizer.piece(token_id).decode("utf-8", "replace")
    except (ValueError, IndexError):
        return ""


def _ordered_eos_ids(tokenizer: Any) -> list[int]:
    """EOS ids, the model's main one first (a ``.t`` file keeps the GGUF's order)."""
    data = getattr(tokenizer, "data", None)
    ordered = list(getattr(data, "eos_ids", None) or [])
    return ordered + sorted(set(tokenizer.eos_ids) - set(ordered))


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """Token ids after which the assistant's reply is over.

    EOS ids alone are not enough: many chat models end turns with another token
    (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``); generation stops at any one.
    """
    ids = set(tokenizer.eos_ids)
    for text in END_OF_TURN_TOKENS:
        token_id = tokenizer.special_id(text)
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids)


def template_for(tokenizer: Any,
                 override_path: str | os.PathLike | None = None) -> ChatTemplate:
    """The chat template to use: ``override_path``'s, else the tokenizer's own.

    ``bos_token``/``eos_token`` are the tokenizer's, as transformers passes them;
    templates such as Llama 3's start the prompt with ``{{ bos_token }}``.
    """
    bos_id = tokenizer.bos_id
    bos = _token_text(tokenizer, bos_id) if bos_id is not None and bos_id >= 0 else ""
    eos_ids = _ordered_eos_ids(tokenizer)
    eos = _token_text(tokenizer, eos_ids[0]) if eos_ids else ""
    if override_path is not None:
        return ChatTemplate.from_file(override_path, bos_token=bos, eos_token=eos)
    source = tokenizer.chat_template
    if not source:
        raise ChatTemplateError(_NO_TEMPLATE)
    return ChatTemplate(source, bos_token=bos, eos_token=eos)


__all__ = ["END_OF_TURN_TOKENS", "ChatTemplate", "ChatTemplateError", "end_of_turn_ids",
           "template_for"]
