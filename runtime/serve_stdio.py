"""`nemocompile serve --stdio`: the runtime as a JSON-lines subprocess.

Protocol (one JSON object per line, UTF-8):

request   {"id": 7, "prompt": "def f(", "mode": "linear-spec", "max_new_tokens": 64}
          ``prompt`` is text or a list of token ids (or ``messages``: a chat, rendered with
          the checkpoint's template). Optional: mode, max_new_tokens, block_length,
          threshold, temperature, seed, eos, steps, max_thinking_tokens, end_think_token_id,
          chat, chat_template_kwargs (with a chat: template variables such as
          {"enable_thinking": false}), stream. ``id`` is any JSON
          value, echoed back.
events    {"id": 7, "event": "tokens", "tokens": [..], "text": "..."}  only with "stream": true,
          one per commit; ``text`` is the new text since the previous event.
final     {"id": 7, "done": true, "text": "...", "tokens": [..], "finish_reason": "stop"|"length",
           "stats": {...}}
          or {"id": 7, "done": true, "error": {"type": "invalid_request"|"runtime_error",
           "message": "..."}}; a line that is not a JSON object gets "id": null.

Requests are served one at a time in arrival order. EOF on stdin ends the process
with status 0; SIGINT with status 130, after the final line of the request in flight
(``"type": "interrupted"``). A line that is not UTF-8 gets an error line. Only
protocol lines go to stdout; everything else to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, TextIO

from nemocompile.errors import NemocompileError

KNOBS = ("mode", "max_new_tokens", "block_length", "threshold", "temperature", "seed", "eos", "steps",
         "chat_template_kwargs", "max_thinking_tokens", "end_think_token_id")
FIELDS = {"id", "prompt", "messages", "chat", "stream", *KNOBS}


class RequestError(NemocompileError):
    """A request that cannot be served as written."""


def parse_request(raw: dict) -> tuple[Any, dict, bool]:
    """The prompt, the generate() keywords and whether to stream, from one request object."""
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    if ("prompt" in raw) == ("messages" in raw):
        raise RequestError("give exactly one of 'prompt' (text or token ids) and 'messages' (a chat)")
    kwargs = {k: raw[k] for k in KNOBS if k in raw and raw[k] is not None}
    for key in ("chat", "stream"):
        if key in raw and not isinstance(raw[key], bool):
            raise RequestError(f"'{key}' must be true or false, got {raw[key]!r}")
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RequestError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
        return messages, {**kwargs, "chat": True}, bool(raw.get("stream", False))
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty")
    elif not (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)):
        raise RequestError("'prompt' must be text or a non-empty list of token ids")
    return prompt, {**kwargs, "chat": bool(raw.get("chat", False))}, bool(raw.get("stream", False))


def handle(runtime, raw: Any, write: Callable[[dict], None]) -> None:
    """Serve one decoded request line, writing its events and final line."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    try:
        if not isinstance(raw, dict):
            raise RequestError("each line must be a JSON object")
        prompt, kwargs, stream = parse_request(raw)
        if stream:
            tokens: list[int] = []
            shown = ""
            it = runtime.generate(prompt, stream=True, **kwargs)
            for chunk in it:
                tokens += chunk
                event = {"id": rid, "event": "tokens", "tokens": chunk}
                if runtime.tokenizer is not None:
                    text = runtime.tokenizer.decode(tokens)
                    if text.endswith("\ufffd"):  # a partial UTF-8 character: wait for the rest
                        event["text"] = ""
                    else:
                        event["text"], shown = text[len(shown):], text
                write(event)
            result = it.result
        else:
            result = runtime.generate(prompt, **kwargs)
    except NemocompileError as e:
        write({"id": rid, "done": True, "error": {"type": "invalid_request", "message": str(e)}})
        return
    except BrokenPipeError:  # stdout's reader is gone: nothing can be reported to it
        raise
    except Exception as e:  # a bug must not take the server down: report it and keep serving
        write({"id": rid, "done": True, "error": {"type": "runtime_error", "message": f"{type(e).__name__}: {e}"}})
        return
    write({"id": rid, "done": True, "text": result.text, "tokens": result.tokens,
           "finish_reason": result.finish_reason, "stats": result.stats.to_dict()})


def serve_stdio(runtime, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Serve requests from ``stdin`` until EOF."""
    stdin = stdin or sys.stdin.buffer  # bytes: a line that is not UTF-8 must not end the server
    out = stdout or sys.stdout
    if stdout is None:
        sys.stdout = sys.stderr  # stray prints must not corrupt the protocol stream

    def write(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    print(f"nemocompile serve --stdio: {runtime.name} ({', '.join(runtime.modes)}) on {runtime.backend.name}; "
          "one JSON request per line", file=sys.stderr, flush=True)
    in_flight: list = []  # the id of the request being served, while it is
    try:
        for line in stdin:
            if isinstance(line, bytes):  # sys.stdin's bytes: a line that is not UTF-8 is one bad request
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    write({"id": None, "done": True, "error": {
                        "type": "invalid_request", "message": f"the line is not UTF-8 text (byte {e.start})"}})
                    continue
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                write({"id": None, "done": True, "error": {"type": "invalid_json", "message": f"not valid JSON: {e}"}})
                continue
            in_flight[:] = [raw.get("id") if isinstance(raw, dict) else None]
            handle(runtime, raw, write)
            in_flight.clear()
    except KeyboardInterrupt:
        # every request still gets exactly one final line, even the one the interrupt cut short
        if in_flight:
            with contextlib.suppress(OSError, ValueError):
                write({"id": in_flight[0], "done": True, "error": {
                    "type": "interrupted", "message": "the server was interrupted before the request finished"}})
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if stdout is None:
            sys.stdout = out
        runtime.close()
    return 0
