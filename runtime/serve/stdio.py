"""`nemocompile serve --stdio`: the runtime as a JSON-lines subprocess.

Protocol (one JSON object per line, UTF-8):

request   {"id": 7, "prompt": "def f(", "mode": "linear-spec", "max_new_tokens": 64}
          ``prompt`` is text or a list of token ids (or ``messages``: a chat, rendered with
          the checkpoint's template). Optional: mode, max_new_tokens, block_length,
          threshold, temperature, seed, eos, steps, max_thinking_tokens, end_think_token_id,
          chat, chat_template_kwargs (with a chat: template variables such as
          {"enable_thinking": false}), stream, timeout (seconds), stop (a string or up to 4:
          the text ends before the first, finish_reason "stop"), stop_token_ids, ignore_eos,
          min_tokens. ``id`` is any JSON
          value, echoed back; ``mode`` may be "auto".
cancel    {"cancel": 7}: stop request 7 and free its row; its final line is an error of
          type "cancelled". A cancel of an id not in flight (finished, or never sent) is
          answered {"cancel": 7, "error": {"type": "unknown_id", "message": "..."}}.
ids       a request whose ``id`` (not null) is already in flight is refused at once with an
          error of type "duplicate_id" (the running one goes on): replies and cancels name
          one request each.
events    {"id": 7, "event": "tokens", "tokens": [..], "text": "..."}  only with "stream": true,
          one per commit; ``text`` is the new text since the previous event.
final     {"id": 7, "done": true, "text": "...", "tokens": [..], "finish_reason": "stop"|"length",
           "stats": {...}}
          or {"id": 7, "done": true, "error": {"type": "invalid_request"|"invalid_json"|"overloaded"|
           "timeout"|"cancelled"|"server_error"|"runtime_error", "message": "..."}}; a line that is
           not a JSON object gets "id": null. "server_error": the server failed this request alone
           (the others go on); "runtime_error": an unexpected exception.

Requests run concurrently (the runtime's engine gives each a row of the batch graphs):
lines of different requests interleave, each tagged with its id. At most
``max_queue`` requests wait for a row; a further one gets an "overloaded" error at
once. EOF on stdin ends the process with status 0 once every request in flight has
its final line; SIGINT or SIGTERM with status 130, after a final line (``"type": "interrupted"``)
for every request in flight. A line that is not UTF-8 gets an error line. Only
protocol lines go to stdout; everything else to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from typing import Any, Callable, TextIO

from nemocompile.errors import NemocompileError

from nemocompile.runtime.job import Cancelled, Overloaded, RequestTimeout, ServerError

KNOBS = ("mode", "max_new_tokens", "block_length", "threshold", "temperature", "seed", "eos", "steps",
         "chat_template_kwargs", "max_thinking_tokens", "end_think_token_id", "timeout", "stop", "stop_token_ids",
         "ignore_eos", "min_tokens",
         "sampling", "response_format")  # Runtime.submit's: {"top_p": ..., ...}, OpenAI's response_format
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


def error_type(e: BaseException) -> str:
    for cls, name in ((Overloaded, "overloaded"), (RequestTimeout, "timeout"), (Cancelled, "cancelled"),
                      (ServerError, "server_error")):
        if isinstance(e, cls):
            return name
    return "invalid_request" if isinstance(e, NemocompileError) else "runtime_error"


def submit(runtime, raw: Any, request_timeout: float | None = None):
    """Queue one decoded request line: (its id, its job, whether to stream). Raises a
    ``NemocompileError`` for a request that cannot run."""
    if not isinstance(raw, dict):
        raise RequestError("each line must be a JSON object")
    prompt, kwargs, stream = parse_request(raw)
    kwargs.setdefault("timeout", request_timeout)
    chat, template = kwargs.pop("chat", False), kwargs.pop("chat_template_kwargs", None)
    return runtime.submit(prompt, chat=chat, chat_template_kwargs=template, **kwargs), stream


def relay(runtime, rid, job, stream: bool, write: Callable[[dict], None]) -> dict:
    """Write a job's events (when streaming); its final line."""
    try:
        for commit in job:
            if not stream:
                continue
            event = {"id": rid, "event": "tokens", "tokens": commit.tokens}
            if commit.text is not None:  # new text, held back near a possible stop string (runtime/output.py)
                event["text"] = commit.text
            write(event)
        result = job.results[0]
    except Exception as e:  # a bug must not take the server down: report it and keep serving
        message = str(e) if isinstance(e, NemocompileError) else f"{type(e).__name__}: {e}"
        return {"id": rid, "done": True, "error": {"type": error_type(e), "message": message}}
    return {"id": rid, "done": True, "text": result.text, "tokens": result.tokens,
            "finish_reason": result.finish_reason, "stats": result.stats.to_dict()}


def serve_stdio(runtime, stdin: TextIO | None = None, stdout: TextIO | None = None,
                request_timeout: float | None = None) -> int:
    """Serve requests from ``stdin`` until EOF, concurrently. The caller owns ``runtime``
    (and closes it: the engine stops after the step in flight)."""
    stdin = stdin or sys.stdin.buffer  # bytes: a line that is not UTF-8 must not end the server
    out = stdout or sys.stdout
    if stdout is None:
        sys.stdout = sys.stderr  # stray prints must not corrupt the protocol stream
    lock = threading.Lock()
    in_flight: dict[int, tuple[Any, Any, threading.Thread]] = {}  # serial -> (id, job, relay thread)
    closed = threading.Event()  # interrupted: only the "interrupted" final lines are written

    broken = threading.Event()  # stdout's reader went away: stop like a Unix tool (exit 141)

    def write(obj: dict, last: bool = False, key: int | None = None) -> None:
        with lock:
            in_flight.pop(key, None)  # a request's final line and its leaving in_flight are one step
            if (closed.is_set() and not last) or broken.is_set():
                return
            try:
                out.write(json.dumps(obj) + "\n")
                out.flush()
            except BrokenPipeError:
                broken.set()
                for _, job, _ in in_flight.values():
                    job.cancel()

    print(f"nemocompile serve --stdio: {runtime.name} ({', '.join(runtime.modes)}) on {runtime.backend.name}; "
          "one JSON request per line", file=sys.stderr, flush=True)
    serial = 0

    def start(raw) -> None:
        nonlocal serial
        rid = raw.get("id") if isinstance(raw, dict) else None
        with lock:
            taken = rid is not None and any(other == rid for other, _, _ in in_flight.values())
        if taken:
            write({"id": rid, "done": True, "error": {"type": "duplicate_id", "message": (
                f"id {json.dumps(rid)[:60]} is already in flight; give each request its own id (this one was "
                "not run; the first goes on)")}})
            return
        try:
            job, stream = submit(runtime, raw, request_timeout)
        except NemocompileError as e:
            write({"id": rid, "done": True, "error": {"type": error_type(e), "message": str(e)}})
            return
        serial += 1
        key = serial
        thread = threading.Thread(target=lambda: write(relay(runtime, rid, job, stream, write), key=key),
                                  name=f"nemocompile-stdio-{key}", daemon=True)
        in_flight[key] = (rid, job, thread)
        thread.start()

    def cancel(rid) -> None:
        with lock:
            jobs = [job for other, job, _ in in_flight.values() if other == rid]
        for job in jobs:
            job.cancel()
        if not jobs:
            write({"cancel": rid, "error": {"type": "unknown_id", "message": (
                f"no request with id {json.dumps(rid)[:60]} is in flight (finished, or never sent): nothing "
                "to cancel")}})

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
            if isinstance(raw, dict) and set(raw) == {"cancel"}:
                cancel(raw["cancel"])
                continue
            start(raw)
            if broken.is_set():
                break
        for _, _, thread in list(in_flight.values()):
            thread.join()  # EOF: every request gets its final line before the process ends
        if broken.is_set():
            raise BrokenPipeError("stdout's reader went away")
    except KeyboardInterrupt:
        # every request still gets exactly one final line, even those the interrupt cut short
        with lock:
            closed.set()
            unfinished = [(rid, job) for rid, job, _ in in_flight.values()]  # no final line yet
        for rid, job in unfinished:
            job.cancel()
            with contextlib.suppress(OSError, ValueError):
                write({"id": rid, "done": True, "error": {
                    "type": "interrupted", "message": "the server was interrupted before the request finished"}},
                      last=True)
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if stdout is None:
            sys.stdout = out
    return 0
