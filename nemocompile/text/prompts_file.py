"""The prompts file that `parity --prompts` and `bench --prompts` both read.

One prompt per line, UTF-8: a JSON object with ``"prompt"`` (text) or
``"ids"`` (token ids), or a plain text line taken as it is. Blank lines are
skipped. Errors name the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemocompile.errors import NemocompileError


def read_prompts_file(path: str | Path, error: type[NemocompileError] = NemocompileError) -> list:
    """The prompts of ``path`` (text or token-id lists), raising ``error`` on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such prompts file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); convert the file to UTF-8, "
                    "e.g. iconv -f latin1 -t utf-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e})") from None
        ids = obj.get("ids")
        if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            prompts.append(ids)
        elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
            prompts.append(obj["prompt"])
        else:
            raise error(f'{path}:{n}: expected a JSON object with "prompt" or an "ids" field (non-empty text or '
                        "a list of token ids), or a plain text line")
    if not prompts:
        raise error(f"{path}: no prompts")
    return prompts
