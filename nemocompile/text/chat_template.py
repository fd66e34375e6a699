"""Chat templates rendered exactly as ``transformers``' ``apply_chat_template`` renders them.

Checkpoints ship Jinja templates written against transformers' environment, so
the same text needs the same environment: a sandboxed Jinja with
``trim_blocks``/``lstrip_blocks`` and loop controls, a ``tojson`` that does not
escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace``; the variables ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's named special tokens and any extra
template keywords (``enable_thinking``...). This module is that environment,
written after ``transformers.utils.chat_template_utils`` (transformers 5)
because nemocompile does not depend on transformers at run time; the tests
compare the two on several templates.

Where the templates live (transformers' rules): ``chat_template.jinja`` (and
``additional_chat_templates/NAME.jinja``) take priority over
``tokenizer_config.json``'s ``chat_template``, which is a string or a list of
``{"name", "template"}``; with several templates, ``default`` is used unless a
name is given (``tool_use`` when tools are passed and it exists).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from nemocompile.errors import CheckpointError, GenerationError

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: passed to every template
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# names a message's reasoning is passed under (transformers aliases them to each other)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def find_templates(directory: Path, tokenizer_config: dict) -> dict[str, str]:
    """Every chat template of a checkpoint by name ({} when it has none)."""
    templates: dict[str, str] = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if templates:
        return templates
    raw = tokenizer_config.get("chat_template")
    source = directory / "tokenizer_config.json"
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw):
        return {t["name"]: t["template"] for t in raw}
    raise CheckpointError(f"{source}: 'chat_template' must be a string or a list of "
                          '{"name": ..., "template": ...} objects')


def pick_template(templates: dict[str, str], name: str | None, tools, where: str) -> str:
    """transformers' ``get_chat_template``: a named template, else ``tool_use`` with tools, else ``default``."""
    if not templates:
        raise CheckpointError(f"{where}: no chat template (neither chat_template.jinja nor a 'chat_template' in "
                              "tokenizer_config.json); send plain text prompts instead of a chat")
    if name is not None:
        if name not in templates:
            raise GenerationError(f"no chat template named {name!r}; this checkpoint has {sorted(templates)}")
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:
        return next(iter(templates.values()))
    raise GenerationError(f"this checkpoint has several chat templates {sorted(templates)} and no 'default'; "
                          "name one")


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The named special tokens as strings (tokenizer_config writes a string or an AddedToken object)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def render(template: str, messages: list[dict], tools: list[dict] | None = None,
           documents: list[dict] | None = None, add_generation_prompt: bool = False,
           special: dict[str, str] | None = None, **template_kwargs) -> str:
    """One conversation rendered as transformers' ``render_jinja_template`` renders it.
    A template's ``raise_exception`` becomes a :class:`GenerationError` with its message."""
    import jinja2

    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise GenerationError("a chat must be a list of {'role': ..., 'content': ...} messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise GenerationError("tools must be a list of JSON-schema objects")
    if documents is not None and not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
        raise GenerationError("documents must be a list of {'title': ..., 'text': ...} objects")
    # transformers drops None-valued keys (APIs send content=None) and aliases the reasoning fields
    chat = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    try:
        return _compile(template).render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**(special or {}), **template_kwargs})
    except jinja2.exceptions.TemplateError as e:
        raise GenerationError(f"the chat template refused this chat: {e}") from None


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() and dict.fromkeys() without exposing the dict type itself to the sandbox
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore attributes (no reaching CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class GenerationTag(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for training masks; it renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"the checkpoint's chat template is not valid Jinja (line {e.lineno}: {e.message})") \
            from None


def template_kwargs_from(value: Any, what: str = "chat_template_kwargs") -> dict[str, Any]:
    """Validate a request's extra template keywords (a JSON object with string keys)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise GenerationError(f"{what} must be an object of template variables, e.g. {{\"enable_thinking\": false}}")
    reserved = sorted(set(value) & {"messages", "add_generation_prompt"})
    if reserved:
        raise GenerationError(f"{what} cannot set {reserved}: they come from the request itself")
    return dict(value)
