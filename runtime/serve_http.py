"""`nemocompile serve --http`: an OpenAI-compatible HTTP API over the runtime (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text: queue depth, active rows, tokens/s, time to
first token and latency histograms, decode cycles per mode).

The decode mode and its knobs are extra body fields: ``mode`` ("ar",
"diffusion", "linear-spec", "quadratic-spec", "auto"), ``block_length``, ``threshold``,
``steps``, ``eos``, and the thinking budget ``max_thinking_tokens`` /
``end_think_token_id``; chat requests also take ``chat_template_kwargs``
(vLLM/SGLang's field, e.g. ``{"enable_thinking": false}``), passed to the
checkpoint's chat template.
``temperature`` defaults to 0 (greedy) and ``max_tokens`` to 64. ``usage``
also reports ``forwards``, ``tokens_per_forward``, ``acceptance_length``,
``time_to_first_token_s``, ``tokens_per_second``, ``queue_s``, ``mode_mix`` and ``rows_per_forward`` (the batch size its forwards ran at)
(decode cycles per mode: what ``auto`` chose).

Requests run concurrently: the runtime's engine gives each a row of the batch
graphs (continuous batching). Pressure: at most ``max_queue`` requests wait for
a row, a further one gets ``429`` (type ``overloaded``, retry later); a request
past its ``timeout`` (body field, or the server's ``request_timeout``) ends with
``504`` (type ``timeout``), or an in-band error event when streaming; a client
that disconnects frees its row at the next step.
"""

# no `from __future__ import annotations`: FastAPI must resolve the handlers' Request annotation
import asyncio
import json
import socket
import sys
import time
import uuid
from typing import Any

from nemocompile.errors import NemocompileError
from nemocompile.request import RequestError

from .job import Overloaded, RequestTimeout

DEFAULT_MAX_TOKENS = 64
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 before they are read in full

# OpenAI fields accepted only at their no-op value (anything else is a clear 400)
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False), "top_logprobs": (None, 0),
           "stop": (None, [], ""), "suffix": (None,), "top_p": (1, 1.0), "presence_penalty": (0, 0.0),
           "frequency_penalty": (0, 0.0), "logit_bias": (None, {}), "user": None, "stream_options": None,
           "parallel_tool_calls": None, "response_format": (None, {"type": "text"})}
KNOBS = ("mode", "block_length", "threshold", "steps", "eos", "temperature", "seed", "max_thinking_tokens",
         "end_think_token_id", "timeout")
COMMON = {"model", "stream", "max_tokens", *KNOBS, *NEUTRAL}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "chat_template_kwargs"}  # the vLLM/SGLang field


def final_chunks(chunk, usage: dict, finish_reason: str, include_usage: bool) -> list[dict]:
    """The closing stream chunks: the finish reason, with usage on it or (OpenAI's
    ``stream_options.include_usage``) in a separate chunk without choices."""
    last = chunk("", [], finish_reason)
    if include_usage:
        return [last, {**chunk("", []), "choices": [], "usage": usage}]
    return [{**last, "usage": usage}]


def check_dependencies() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise NemocompileError("the HTTP server needs fastapi, uvicorn and prometheus_client: "
                               "pip install 'nemocompile[serve]'") from None


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def parse_body(body: Any, allowed: set[str], model_name: str) -> dict:
    """generate() keywords from an OpenAI request body (prompt/messages handled by the caller)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(f"unsupported field(s) {unknown}", param=unknown[0])
    for key, ok in NEUTRAL.items():
        if ok is not None and key in body and body[key] not in ok:
            raise APIError(f"'{key}' = {body[key]!r} is not supported by this server (only {ok[0]!r})", param=key)
    if body.get("model") not in (None, model_name):
        raise APIError(f"model {body['model']!r} does not exist; this server serves {model_name!r}", 404,
                       "model_not_found", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs = {k: body[k] for k in KNOBS if body.get(k) is not None}
    kwargs["max_new_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not isinstance(body.get("stream", False), bool):
        raise APIError("'stream' must be true or false", param="stream")
    return kwargs


def usage(prompt_tokens: int, result) -> dict:
    s = result.stats
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": prompt_tokens + len(result.tokens),
            "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens}, "forwards": s.forwards,
            "tokens_per_forward": s.tokens_per_forward, "acceptance_length": s.acceptance_length,
            "time_to_first_token_s": s.time_to_first_token_s, "tokens_per_second": s.tokens_per_second,
            "queue_s": s.queue_s, "mode": s.mode, "mode_mix": s.mode_mix,
            "rows_per_forward": s.rows_per_forward}


def create_app(runtime, model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               request_timeout: float | None = None):
    """The FastAPI application serving ``runtime``. The event loop only parses and
    relays: tokenization runs on a thread and generation on the runtime's engine;
    a generation whose client disconnected is cancelled at its next step."""
    check_dependencies()
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    from .metrics import ServerMetrics

    name = model_name or runtime.name
    created = int(time.time())
    metrics = ServerMetrics(runtime)

    app = FastAPI(title="nemocompile", description="OpenAI-compatible API over a tri-mode runtime")

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        # ASCII JSON: a message quoting the client's lone surrogate ("\\ud800") must still encode
        return Response(json.dumps(exc.body()), status_code=exc.status, media_type="application/json")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "backend": runtime.backend.name, "modes": runtime.modes,
                "block_lengths": runtime.block_lengths, "cache_capacity": runtime.capacity}

    @app.get("/metrics")
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "nemocompile", "modes": runtime.modes}]}

    async def read_json(request: Request) -> Any:
        too_large = APIError(f"the request body exceeds {max_body_bytes} bytes", 413, "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large  # refused before reading a byte of it
        body = bytearray()
        async for part in request.stream():  # a missing or false content-length: count as it arrives
            body += part
            if len(body) > max_body_bytes:
                raise too_large
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON in UTF-8 ({e})") from None

    def submit(prompt, kwargs: dict, names: dict, template_kwargs: dict | None = None):
        """Encode, validate and queue: bad requests never wait. Runs on a thread (a long
        prompt's tokenization must not hold the event loop). Returns the prompt ids and the job."""
        kwargs.setdefault("timeout", request_timeout)
        try:
            prompts, batched = runtime.encode(prompt, chat=kwargs.pop("chat", False),
                                              chat_template_kwargs=template_kwargs)
            if batched:
                raise APIError("send one prompt per request")
            return prompts[0], runtime.submit(prompts[0], **kwargs, names=names)
        except Overloaded as e:
            metrics.reject("overloaded")
            raise APIError(str(e), 429, "overloaded") from None
        except RequestError as e:
            raise APIError(str(e), param=e.param) from None
        except NemocompileError as e:
            raise APIError(str(e)) from None

    def failure(e: BaseException) -> APIError:
        if isinstance(e, RequestTimeout):
            return APIError(str(e), 504, "timeout")
        if isinstance(e, NemocompileError):
            return APIError(str(e), 500, "server_error")
        return APIError(f"{type(e).__name__}: {e}", 500, "server_error")

    async def run_generation(request: Request, job):
        """Wait for the whole generation (no thread held); cancelled if the client goes away."""

        async def drain():
            async for _ in job:
                pass

        done = asyncio.ensure_future(drain())
        try:
            while not done.done():
                if await request.is_disconnected():
                    return None
                await asyncio.wait({done}, timeout=0.25)
            done.result()
            return job.results[0]
        except NemocompileError as e:
            raise failure(e) from None
        finally:
            done.cancel()
            job.cancel()  # a no-op once finished; frees the row otherwise (also when this handler is cancelled)

    def stream_events(ids: list[int], job, make_chunk, make_final):
        """SSE body: relays each commit of the job as the engine emits it."""

        async def body():
            tokens: list[int] = []
            shown = ""
            try:
                async for _, value in job:
                    tokens += value
                    text = runtime.tokenizer.decode(tokens) if runtime.tokenizer is not None else ""
                    if text.endswith("\ufffd"):
                        continue  # a partial UTF-8 character: wait for the rest
                    delta, shown = text[len(shown):], text
                    yield _sse(make_chunk(delta, value))
                for c in make_final(job.results[0], ids):
                    yield _sse(c)
            except Exception as e:  # reported in-band: the status line is already sent
                yield _sse(failure(e).body())
            finally:
                job.cancel()  # the client went away: free the row at the next step
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    def envelope(rid: str, obj: str, payload: dict, tokens: list[int], finish: str | None) -> dict:
        """One response or stream chunk: a single choice carrying ``payload``."""
        return {"id": rid, "object": obj, "created": int(time.time()), "model": name,
                "choices": [{"index": 0, **payload, "tokens": tokens, "logprobs": None, "finish_reason": finish}]}

    async def answer(request: Request, body: dict, ids: list[int], job, chunk, on_delta, reply):
        """Decode ``ids``: a server-sent event stream of ``on_delta`` chunks closed by
        ``chunk``'s final ones, or one response that ``reply(result)`` builds."""
        include_usage = _include_usage(body)

        def final(result, ids) -> list[dict]:
            return final_chunks(chunk, usage(len(ids), result), result.finish_reason, include_usage)

        if body.get("stream"):
            return stream_events(ids, job, on_delta, final)
        result = await run_generation(request, job)
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return {**reply(result), "usage": usage(len(ids), result)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        kwargs = parse_body(body, COMPLETION_FIELDS, name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)):
            raise APIError("'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                           param="prompt")
        ids, job = await asyncio.to_thread(submit, prompt, kwargs, _names(body))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def chunk(delta: str, tokens: list[int], finish=None) -> dict:
            return envelope(rid, "text_completion", {"text": delta}, tokens, finish)

        def reply(result) -> dict:
            return envelope(rid, "text_completion", {"text": result.text or ""}, result.tokens,
                            result.finish_reason)

        return await answer(request, body, ids, job, chunk, chunk, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        kwargs = parse_body(body, CHAT_FIELDS, name)
        messages = _messages(body.get("messages"))
        ids, job = await asyncio.to_thread(submit, messages, {**kwargs, "chat": True}, _names(body),
                                           body.get("chat_template_kwargs"))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def chunk(delta: str, tokens: list[int], finish=None, first=False) -> dict:
            d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta or tokens else {})
            return envelope(rid, "chat.completion.chunk", {"delta": d}, tokens, finish)

        started = False

        def on_delta(text: str, tokens: list[int]) -> dict:
            nonlocal started
            first, started = not started, True
            return chunk(text, tokens, first=first)

        def reply(result) -> dict:
            message = {"role": "assistant", "content": result.text or ""}
            return envelope(rid, "chat.completion", {"message": message}, result.tokens, result.finish_reason)

        return await answer(request, body, ids, job, chunk, on_delta, reply)

    return app


def _names(body: dict) -> dict[str, str]:
    """The request's own spelling of the runtime's field names, for error messages."""
    return {"max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _messages(messages) -> list[dict]:
    """Chat messages with text content (OpenAI's list-of-parts form is joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError("each message needs a 'role' and a 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError("only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError("message 'content' must be text", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve_http(runtime, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
               request_timeout: float | None = None) -> int:
    """Serve until interrupted. Port 0 picks a free port; the address is printed to stderr.
    The caller owns ``runtime`` (and closes it)."""
    check_dependencies()
    import uvicorn

    app = create_app(runtime, model_name, request_timeout=request_timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise NemocompileError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    bound = sock.getsockname()[1]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}, beyond loopback; the API has no authentication", file=sys.stderr)
    print(f"nemocompile serve --http: {runtime.name} ({', '.join(runtime.modes)}) on {runtime.backend.name}; "
          f"listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
