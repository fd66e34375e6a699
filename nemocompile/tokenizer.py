"""The checkpoint's tokenizer: Hugging Face ``tokenizers`` plus its jinja chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
        self.chat_template: str | None = self.config.get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]] | str, add_generation_prompt: bool = True) -> str:
        """Render messages (or a single user message) with the template of tokenizer_config.json."""
        if self.chat_template is None:
            raise CheckpointError(
                f"{self.directory / 'tokenizer_config.json'}: no 'chat_template'; run without --chat"
            )
        import jinja2

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        special = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
