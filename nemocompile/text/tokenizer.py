"""The checkpoint's tokenizer: Hugging Face ``tokenizers`` plus its jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from nemocompile.text.chat_template import find_templates, pick_template, render, special_tokens, template_kwargs_from
from nemocompile.errors import CheckpointError, GenerationError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class Tokenizer:
    """Encodes and decodes text; renders chat messages with the checkpoint's template."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint needs a Hugging Face tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: not a valid tokenizers file ({e})") from None
        self.directory = directory
        cfg_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        self.chat_templates: dict[str, str] = find_templates(directory, self.config)  # by name
        self.chat_template: str | None = self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict] | str, tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, documents: list[dict] | None = None,
                            **template_kwargs) -> str | list[int]:
        """Render a conversation (or one user message) as transformers' ``apply_chat_template``
        does (see :mod:`nemocompile.chat_template`); ``template_kwargs`` reach the template
        (``enable_thinking=False``...). ``tokenize=True`` returns the token ids."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        template = pick_template(self.chat_templates, chat_template, tools, str(self.directory))
        text = render(template, messages, tools=tools, documents=documents,
                      add_generation_prompt=add_generation_prompt, special=special_tokens(self.config),
                      **template_kwargs)
        return self.encode(text) if tokenize else text

    @property
    def thinking_tokens(self) -> dict[str, int]:
        """The ids of ``<think>`` and ``</think>`` when the vocabulary has them as single tokens."""
        ids = {t: self.token_to_id(t) for t in ("<think>", "</think>")}
        return {t: i for t, i in ids.items() if i is not None}


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: lone surrogates arrive from a command-line
    argument with invalid UTF-8 bytes (Python's surrogateescape) or from a JSON "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not valid UTF-8 text (character {e.start}: an invalid byte or a lone "
                              "surrogate); send UTF-8 text or token ids") from None


def encode_prompts(tokenizer: Tokenizer | None, vocab_size: int, prompt, chat: bool = False,
                   owner: str = "checkpoint", template_kwargs: dict | None = None) -> tuple[list[list[int]], bool]:
    """Token lists for a str, a list of str, token ids, a list of id lists, or (with
    ``chat``) one conversation of {"role", "content"} messages; and whether it was a batch.
    ``template_kwargs`` (e.g. ``{"enable_thinking": False}``) reach the chat template."""
    template_kwargs = template_kwargs_from(template_kwargs)
    if template_kwargs and not chat:
        raise GenerationError("chat template keywords only apply to chats: pass chat=True (--chat) as well")
    def need_tokenizer() -> Tokenizer:
        if tokenizer is None:
            raise GenerationError(f"this {owner} has no tokenizer.json: pass token ids instead of text")
        return tokenizer

    def one(p) -> list[int]:
        if isinstance(p, str):
            check_text(p, "the prompt")
            tok = need_tokenizer()
            return tok.encode(tok.apply_chat_template(p, **template_kwargs) if chat else p)
        if isinstance(p, dict):
            raise GenerationError("pass chat messages as a list of {'role', 'content'} objects with chat=True")
        try:
            ids = [int(t) for t in p]
        except (TypeError, ValueError):
            raise GenerationError(f"a prompt must be text or a list of token ids, got {p!r:.60}") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
        return ids

    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        return [one(prompt)], False
    prompt = list(prompt)
    if chat and prompt and all(isinstance(m, dict) for m in prompt):  # one conversation
        for m in prompt:
            if m.get("role") not in CHAT_ROLES:
                raise GenerationError(f"chat role {m.get('role')!r} is not one of {', '.join(CHAT_ROLES)}")
            if m.get("content") is None and m.get("role") == "assistant" and m.get("tool_calls"):
                continue  # an assistant turn that only called tools
            if not isinstance(m.get("content"), str):
                raise GenerationError("each chat message needs text 'content'")
            check_text(m["content"], "a chat message")
        tok = need_tokenizer()
        return [tok.encode(tok.apply_chat_template(prompt, **template_kwargs))], False
    if prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return [one(p) for p in prompt], True
    return [one(prompt)], False
