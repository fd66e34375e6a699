"""`nemocompile serve --http`: an OpenAI-compatible HTTP API over the runtime (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events), ``GET /v1/models``, ``GET /v1/models/{id}``,
vLLM's ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, ``GET /health``,
``GET /metrics`` (Prometheus text: queue depth, active rows, tokens/s, time to
first token and latency histograms, decode cycles per mode).

The decode mode and its knobs are extra body fields: ``mode`` ("ar",
"diffusion", "linear-spec", "quadratic-spec", "auto"), ``block_length``, ``threshold``,
``steps``, ``eos``, and the thinking budget ``max_thinking_tokens`` /
``end_think_token_id``; chat requests also take ``chat_template_kwargs``
(vLLM/SGLang's field, e.g. ``{"enable_thinking": false}``), passed to the
checkpoint's chat template.
OpenAI's output fields: ``stop``, ``logprobs``/``top_logprobs``, ``echo`` (prompt
scoring, ``max_tokens`` 0 too), ``n``/``best_of`` and lists of prompts (each choice a
request of its own to the engine), vLLM's ``stop_token_ids``, ``ignore_eos`` and
``min_tokens`` (``parse_body`` maps a body to the runtime's keywords; the README lists
every field). ``null`` means the default; metadata fields are ignored; every error,
404 and 405 included, is OpenAI's error shape.
Sampling: ``top_p``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, vLLM's ``top_k``, ``min_p``,
``repetition_penalty`` (nemocompile.sampling; every mode). ``response_format``
``json_object`` / ``json_schema``: constrained decoding (runtime/grammar.py; every mode
but diffusion). Chat ``tools`` / ``tool_choice`` ("auto", "none", "required", a named
function): rendered by the chat template, calls parsed into ``message.tool_calls``
(runtime/serve/tools.py); "required" and a named function constrain the answer to one call.
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
import dataclasses
import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from nemocompile.errors import NemocompileError
from nemocompile.text.request import RequestError

from nemocompile.runtime.job import Overloaded, RequestTimeout
from nemocompile.runtime.serve.tools import assistant_message, chat_tools, stream_delta

DEFAULT_MAX_TOKENS = 64
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 before they are read in full
MAX_CHOICES = 128  # prompts x best_of per request: each choice is a sequence of its own for the engine
MIN_LOGPROB = -9999.0  # what a log-prob of -inf is sent as (JSON has no infinity)

# OpenAI fields accepted only at their no-op value (anything else is a clear 400); null means the default
NEUTRAL = {"suffix": (None,), "modalities": (["text"],)}
# fields a local model has no use for: accepted and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "reasoning_effort", "prompt_cache_key", "safety_identifier",
           "verbosity", "parallel_tool_calls")
KNOBS = ("mode", "block_length", "threshold", "steps", "eos", "temperature", "seed", "max_thinking_tokens",
         "end_think_token_id", "timeout")
OUTPUT = ("stop", "stop_token_ids", "ignore_eos", "min_tokens")  # runtime/output.py
# nemocompile.sampling's controls (OpenAI's top_p and penalties, vLLM's top_k, min_p, repetition_penalty)
SAMPLING = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
COMMON = {"model", "stream", "stream_options", "max_tokens", "n", "response_format", *KNOBS, *OUTPUT, *SAMPLING,
          *NEUTRAL, *IGNORED}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "chat_template_kwargs",  # the vLLM/SGLang field
                        "logprobs", "top_logprobs", "tools", "tool_choice"}


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


@dataclass
class Plan:
    """What one request asks of the runtime: the keywords of every choice's ``Runtime.submit``
    and how the choices are made and returned."""

    kwargs: dict  # Runtime.submit keywords shared by the choices (each choice's seed is offset by its index)
    n: int = 1  # choices returned per prompt
    best_of: int = 1  # choices generated per prompt; the n with the highest log-prob are returned
    stream: bool = False
    logprobs: int | None = None  # alternatives returned per token (None: no log-probs in the response)
    echo: bool = False  # completions: the prompt's text and log-probs first
    score_only: bool = False  # echo with max_tokens 0: the prompt's log-probs, nothing generated


def parse_body(body: Any, allowed: set[str], model_name: str, chat: bool = False) -> tuple[dict, Plan]:
    """The request body without its nulls (null means the default, for every field) and the
    :class:`Plan` it asks for. The one place a body becomes runtime keywords: a new field is
    a line here."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(f"unsupported field(s) {unknown}", param=unknown[0])
    for key, ok in NEUTRAL.items():
        if key in body and body[key] not in ok:
            raise APIError(f"'{key}' = {body[key]!r:.80} is not supported by this server (only {ok[0]!r})",
                           param=key)
    if body.get("model") not in (None, model_name):
        raise APIError(f"model {body['model']!r} does not exist; this server serves {model_name!r}", 404,
                       "model_not_found", "model")
    for key in ("stream", "echo", "ignore_eos") + (("logprobs",) if chat else ()):
        if not isinstance(body.get(key, False), bool):
            raise APIError(f"'{key}' must be true or false", param=key)
    kwargs = {k: body[k] for k in (*KNOBS, *OUTPUT) if k in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs.update(sampling_fields(body))
    kwargs["max_new_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if chat:
        if "top_logprobs" in body and not body.get("logprobs"):
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = body.get("top_logprobs", 0) if body.get("logprobs") else None
    else:
        logprobs = body.get("logprobs")
    echo = bool(body.get("echo", False))
    plan = Plan(kwargs, stream=bool(body.get("stream", False)), logprobs=logprobs, echo=echo)
    plan.n, plan.best_of = _counts(body, chat)
    if logprobs is not None or echo:
        kwargs["logprobs"] = logprobs
    if echo:
        kwargs["echo"] = True
        if max_tokens == 0:  # score the prompt only: one token is generated and dropped
            kwargs["max_new_tokens"], plan.score_only = 1, True
    if plan.best_of > plan.n:
        if plan.stream:
            raise APIError("best_of > n cannot stream (the best choices are known at the end)", param="best_of")
        kwargs.setdefault("logprobs", 0)  # choices are ranked by their log-prob
    return body, plan


def sampling_fields(body: dict) -> dict:
    """The runtime's ``sampling`` and ``response_format`` from a request body (null: the default;
    values are checked by nemocompile.sampling and runtime/grammar.py)."""
    out = {}
    sampling = {k: body[k] for k in SAMPLING if body.get(k) is not None}
    if sampling:
        out["sampling"] = sampling
    if body.get("response_format") is not None:
        out["response_format"] = body["response_format"]
    return out


def _counts(body: dict, chat: bool) -> tuple[int, int]:
    n = body.get("n", 1)
    best_of = n if chat else body.get("best_of", n)
    for key, value in (("n", n), ("best_of", best_of)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
            raise APIError(f"'{key}' must be an integer from 1 to {MAX_CHOICES}, got {value!r:.40}", param=key)
    if best_of < n:
        raise APIError(f"'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of")
    return n, best_of


def prompt_list(prompt) -> list:
    """The prompts of a completions request: text, token ids, or a list of either."""
    def one(p) -> bool:
        return (isinstance(p, str) and bool(p)) or (isinstance(p, list) and bool(p) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p))

    if one(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(one(p) for p in prompt):
        return list(prompt)
    raise APIError("'prompt' must be a non-empty string, a list of token ids, or a list of those (one choice "
                   "per prompt)", param="prompt")


def usage(prompt_tokens: int, results: list) -> dict:
    """OpenAI's usage (summed over the choices) and nemocompile's decode statistics of the first."""
    s = results[0].stats
    completion = sum(len(r.tokens) for r in results)
    # OpenAI's prompt_tokens_details.cached_tokens: prompt tokens the prefix cache served (summed)
    cached = min(prompt_tokens, sum(r.stats.cached_prompt_tokens for r in results))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached},
            "forwards": s.forwards,
            "tokens_per_forward": s.tokens_per_forward, "acceptance_length": s.acceptance_length,
            "time_to_first_token_s": s.time_to_first_token_s, "tokens_per_second": s.tokens_per_second,
            "queue_s": s.queue_s, "mode": s.mode, "mode_mix": s.mode_mix,
            "rows_per_forward": s.rows_per_forward}


class Logprobs:
    """OpenAI's two log-prob shapes from :class:`~.output.TokenLogprob` lists."""

    def __init__(self, tokenizer, k: int):
        self.tokenizer, self.k = tokenizer, k

    def piece(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def completion(self, entries, offset: int = 0) -> dict:
        """The legacy completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the k
        best and the chosen token, by text), ``text_offset``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = self.piece(e.token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(_finite(e.logprob))
            if e.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top: dict[str, float] = {}
                for token, value in (*e.top[:self.k], (e.token, e.logprob)):
                    top.setdefault(self.piece(token), _finite(value))
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    def chat(self, entries) -> dict:
        """The chat shape: ``content[]`` with ``token``, ``logprob``, ``bytes`` and the k best."""
        def item(token: int, value: float | None) -> dict:
            piece = self.piece(token)
            return {"token": piece, "logprob": _finite(value), "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top[:self.k]]}
                            for e in entries], "refusal": None}


def _finite(value: float | None) -> float | None:
    return None if value is None else max(value, MIN_LOGPROB)


def best(results: list, n: int) -> list[int]:
    """Indices of the ``n`` results with the highest total log-prob (best_of), best first."""
    def score(r) -> float:
        return sum(e.logprob for e in r.logprobs or () if e.logprob is not None)

    return sorted(range(len(results)), key=lambda i: -score(results[i]))[:n]


def create_app(runtime, model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               request_timeout: float | None = None):
    """The FastAPI application serving ``runtime``. The event loop only parses and
    relays: tokenization runs on a thread and generation on the runtime's engine;
    a generation whose client disconnected is cancelled at its next step."""
    check_dependencies()
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from nemocompile.runtime.serve.metrics import ServerMetrics

    name = model_name or runtime.name
    created = int(time.time())
    metrics = ServerMetrics(runtime)
    tokenizer = runtime.tokenizer

    app = FastAPI(title="nemocompile", description="OpenAI-compatible API over a tri-mode runtime")

    def error_response(exc: APIError):
        # ASCII JSON: a message quoting the client's lone surrogate ("\\ud800") must still encode
        return Response(json.dumps(exc.body()), status_code=exc.status, media_type="application/json")

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """404 and 405 (and any other routing error) in OpenAI's error shape."""
        kinds = {404: "not_found_error", 405: "method_not_allowed"}
        what = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(f"{request.method} {request.url.path}: {what}", exc.status_code,
                                       kinds.get(exc.status_code, "invalid_request_error")))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "backend": runtime.backend.name, "modes": runtime.modes,
                "block_lengths": runtime.block_lengths, "cache_capacity": runtime.capacity}

    @app.get("/metrics")
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "nemocompile", "modes": runtime.modes,
                "max_model_len": runtime.capacity}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(f"model {model_id!r} does not exist; this server serves {name!r}", 404, "model_not_found",
                           "model")
        return model_card()

    # ---- vLLM's tokenizer endpoints (lm-evaluation-harness's tokenizer_backend=remote probes them) ----
    def need_tokenizer():
        if tokenizer is None:
            raise APIError("this artifact has no tokenizer", 404, "not_found_error")
        return tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = need_tokenizer()
        cfg = tok.config
        keys = ("tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token",
                "additional_special_tokens", "model_max_length")
        info = {k: _token_text(cfg[k]) for k in keys if k in cfg}
        return {**info, "chat_template": tok.chat_template, "vocab_size": tok.vocab_size,
                "max_model_len": runtime.capacity}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        tok = need_tokenizer()
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise APIError("give exactly one of 'prompt' (text) and 'messages' (a chat)", param="prompt")
        if "messages" in body:
            ids = tok.apply_chat_template(_messages(body["messages"]), tokenize=True,
                                          add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                                          **(body.get("chat_template_kwargs") or {}))
        elif isinstance(body["prompt"], str):
            ids = tok.encode(body["prompt"])
        else:
            raise APIError("'prompt' must be text", param="prompt")
        strs = [tok.decode([t], skip_special_tokens=False) for t in ids] if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": runtime.capacity, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        tok = need_tokenizer()
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < runtime.vocab_size for t in ids):
            raise APIError(f"'tokens' must be a list of token ids below {runtime.vocab_size}", param="tokens")
        return {"prompt": tok.decode(ids)}

    async def read_json(request: Request) -> Any:
        too_large = APIError(f"the request body exceeds {max_body_bytes} bytes", 413, "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large  # refused before reading a byte of it
        body = bytearray()
        try:
            async for part in request.stream():  # a missing or false content-length: count as it arrives
                body += part
                if len(body) > max_body_bytes:
                    raise too_large
        except ClientDisconnect:  # the client left mid-body: nothing to answer, nothing to log
            raise APIError("the client disconnected while sending the request", 499, "client_disconnected") \
                from None
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON in UTF-8 ({e})") from None

    def submit(prompts: list, plan: Plan, names: dict, chat: bool = False, template_kwargs: dict | None = None):
        """Encode, validate and queue every choice (``best_of`` per prompt): bad requests never
        wait. Runs on a thread (a long prompt's tokenization must not hold the event loop).
        Returns [(prompt ids, job)], prompt by prompt, choice by choice."""
        kwargs = {**plan.kwargs}
        kwargs.setdefault("timeout", request_timeout)
        seed = kwargs.pop("seed", None)
        if plan.best_of * len(prompts) > MAX_CHOICES:
            raise APIError(f"{len(prompts)} prompts x best_of {plan.best_of} exceed {MAX_CHOICES} choices per "
                           "request; send fewer at a time", param="prompt")
        jobs = []
        try:
            for prompt in prompts:
                encoded, batched = runtime.encode(prompt, chat=chat, chat_template_kwargs=template_kwargs)
                for c in range(plan.best_of):
                    # one sampling stream per choice: choice c of seed s draws from seed s + c
                    choice_seed = seed + c if isinstance(seed, int) and not isinstance(seed, bool) and c else seed
                    jobs.append((encoded[0], runtime.submit(encoded[0], **kwargs, seed=choice_seed, names=names)))
            return jobs
        except BaseException as e:
            for _, job in jobs:
                job.cancel()
            if isinstance(e, Overloaded):
                metrics.reject("overloaded")
                raise APIError(str(e), 429, "overloaded") from None
            if isinstance(e, RequestError):
                raise APIError(str(e), param=e.param) from None
            if isinstance(e, NemocompileError):
                raise APIError(str(e)) from None
            raise

    def failure(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, RequestTimeout):
            return APIError(str(e), 504, "timeout")
        if isinstance(e, NemocompileError):
            return APIError(str(e), 500, "server_error")
        return APIError(f"{type(e).__name__}: {e}", 500, "server_error")

    async def run_generation(request: Request, jobs: list):
        """Wait for every job (no thread held): their results, or None if the client went away
        (the jobs are then cancelled and their rows freed)."""

        async def drain(job):
            async for _ in job:
                pass

        done = [asyncio.ensure_future(drain(job)) for job in jobs]
        try:
            while not all(d.done() for d in done):
                if await request.is_disconnected():
                    return None
                await asyncio.wait(done, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
                if any(d.done() and d.exception() is not None for d in done):
                    break
            for d in done:
                d.result()
            return [job.results[0] for job in jobs]
        except NemocompileError as e:
            raise failure(e) from None
        finally:
            for d, job in zip(done, jobs):
                d.cancel()
                job.cancel()  # a no-op once finished; frees the row otherwise (also when this handler is cancelled)

    def stream_events(jobs: list, on_commit, on_final, closing):
        """SSE body: each choice's commits as the engine emits them (``on_commit(i, event)``), its
        closing chunk when it ends (``on_final(i, result)``), then ``closing(results)``."""

        async def body():
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, job):
                try:
                    async for event in job:
                        await queue.put((i, event))
                    await queue.put((i, None))
                except BaseException as e:  # noqa: BLE001 - relayed to the stream in-band
                    await queue.put((i, e))

            pumps = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
            try:
                left = len(jobs)
                while left:
                    i, event = await queue.get()
                    if isinstance(event, BaseException):
                        raise event
                    if event is None:
                        left -= 1
                        for c in on_final(i, jobs[i].results[0], last=not left):
                            yield _sse(c)
                        continue
                    chunk = on_commit(i, event)
                    if chunk is not None:
                        yield _sse(chunk)
                for c in closing([job.results[0] for job in jobs]):
                    yield _sse(c)
            except Exception as e:  # reported in-band: the status line is already sent
                yield _sse(failure(e).body())
            finally:
                for p, job in zip(pumps, jobs):
                    p.cancel()
                    job.cancel()  # the client went away: free the rows at the next step
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    def envelope(rid: str, obj: str, choices: list[dict]) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": choices}

    async def answer(request: Request, body: dict, plan: Plan, jobs: list, obj: str, choice, delta,
                     final_delta=None):
        """The response for ``jobs`` (prompt by prompt, best_of choices each): a server-sent
        event stream of ``delta(i, event, first)`` choices, closed by ``final_delta(i, result,
        first)`` (default: an empty delta with the result's finish reason), or one response
        whose choice i is ``choice(i, result, ids)``."""
        include_usage = _include_usage(body)
        rid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        prompt_tokens = sum(len(ids) for c, (ids, _) in enumerate(jobs) if c % plan.best_of == 0)

        def trim(result):
            return dataclasses.replace(result, tokens=[], logprobs=[], text="") if plan.score_only else result

        if plan.stream:
            started: set[int] = set()

            def on_commit(i: int, event) -> dict | None:
                first = i not in started
                started.add(i)
                payload = delta(i, event, first)
                return None if payload is None else envelope(rid, obj, [payload])

            def on_final(i: int, result, last: bool) -> list[dict]:
                first = i not in started
                final = (final_delta(i, result, first) if final_delta is not None else
                         {**delta(i, None, first), "finish_reason": result.finish_reason})
                return [envelope(rid, obj, [final])]

            def closing(results) -> list[dict]:
                u = usage(prompt_tokens, [trim(r) for r in results])
                return [{**envelope(rid, obj, []), "usage": u}] if include_usage else []

            if not include_usage:  # usage rides on the last closing chunk, as before stream_options existed
                def on_final(i: int, result, last: bool, _inner=on_final) -> list[dict]:  # noqa: F811
                    chunks = _inner(i, result, last)
                    if last:
                        results = [job.results[0] for _, job in jobs]
                        chunks[-1]["usage"] = usage(prompt_tokens, [trim(r) for r in results])
                    return chunks

            return stream_events([job for _, job in jobs], on_commit, on_final, closing)
        results = await run_generation(request, [job for _, job in jobs])
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        results = [trim(r) for r in results]
        chosen = []
        for p in range(0, len(results), plan.best_of):
            group = results[p:p + plan.best_of]
            chosen += [(p + i, group[i]) for i in (best(group, plan.n) if plan.best_of > plan.n else range(plan.n))]
        choices = [{"index": k, **choice(k, result, jobs[i][0])} for k, (i, result) in enumerate(chosen)]
        return {**envelope(rid, obj, choices), "usage": usage(prompt_tokens, [r for _, r in chosen])}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, plan = parse_body(await read_json(request), COMPLETION_FIELDS, name)
        prompts = prompt_list(body.get("prompt"))
        jobs = await asyncio.to_thread(submit, prompts, plan, _names(body))
        lp = Logprobs(tokenizer, plan.logprobs or 0)

        def prompt_text(ids: list[int]) -> str:
            return tokenizer.decode(ids) if tokenizer is not None else ""

        def choice(_: int, result, ids: list[int]) -> dict:
            head = prompt_text(ids) if plan.echo else ""
            text = head + (result.text or "")
            entries = (result.prompt_logprobs if plan.echo else []) + (result.logprobs or [])
            return {"text": text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                    "logprobs": lp.completion(entries) if plan.logprobs is not None else None}

        offsets: dict[int, int] = {}

        def delta(i: int, event, first: bool) -> dict | None:
            index = i // plan.best_of * plan.n + i % plan.best_of
            if event is None:  # a choice's closing chunk
                return {"index": index, "text": "", "tokens": [], "logprobs": None}
            if plan.score_only and not first:
                return None
            head = prompt_text(jobs[i][0]) if first and plan.echo else ""
            entries = (event.prompt_logprobs or []) if first and plan.echo else []
            tokens, text = event.tokens, event.text or ""
            if not plan.score_only:
                entries = entries + (event.logprobs or [])
            else:
                tokens, text = [], ""
            logprobs = None
            if plan.logprobs is not None:
                logprobs = lp.completion(entries, offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + sum(len(t) for t in logprobs["tokens"])
            return {"index": index, "text": head + text, "tokens": tokens, "logprobs": logprobs,
                    "finish_reason": None}

        return await answer(request, body, plan, jobs, "text_completion", choice, delta)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, plan = parse_body(await read_json(request), CHAT_FIELDS, name, chat=True)
        messages = _messages(body.get("messages"))
        try:
            tools, messages, template_kwargs = chat_tools(body, messages, plan.kwargs)
        except RequestError as e:
            raise APIError(str(e), param=e.param) from None
        jobs = await asyncio.to_thread(submit, [messages], plan, _names(body), True, template_kwargs)
        lp = Logprobs(tokenizer, plan.logprobs or 0)

        def choice(_: int, result, ids) -> dict:
            message, finish = assistant_message(result.text or "", result.finish_reason, tools)
            return {"message": message, "tokens": result.tokens, "finish_reason": finish,
                    "logprobs": lp.chat(result.logprobs or []) if plan.logprobs is not None else None}

        def delta(i: int, event, first: bool) -> dict | None:
            if tools and event is not None:
                return None  # the whole answer is parsed for tool calls at the end
            if event is None:
                d = {"role": "assistant", "content": ""} if first else {}
                return {"index": i, "delta": d, "tokens": [], "logprobs": None}
            text = event.text or ""
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text or event.tokens
                                                                      else {})
            logprobs = lp.chat(event.logprobs or []) if plan.logprobs is not None else None
            return {"index": i, "delta": d, "tokens": event.tokens, "logprobs": logprobs, "finish_reason": None}

        def final_delta(i: int, result, first: bool) -> dict:
            """Streaming with tools: the whole answer in one delta at the end (content or tool_calls)."""
            message, finish = assistant_message(result.text or "", result.finish_reason, tools)
            return {"index": i, "delta": stream_delta(message), "tokens": result.tokens, "logprobs": None,
                    "finish_reason": finish}

        return await answer(request, body, plan, jobs, "chat.completion.chunk" if plan.stream else "chat.completion",
                            choice, delta, final_delta if tools else None)

    return app


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


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
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": None, "tool_calls": m["tool_calls"]})
            continue
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError("only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError("message 'content' must be text", param="messages")
        extra = {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k) is not None}
        out.append({"role": m["role"], "content": content, **extra})
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
        import errno

        fix = "pick another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else \
            "--host must be an address of this machine (e.g. 127.0.0.1, 0.0.0.0, ::1)"
        raise NemocompileError(f"cannot listen on {host}:{port} ({e.strerror}); {fix}") from None
    bound = sock.getsockname()[1]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}, beyond loopback; the API has no authentication", file=sys.stderr)
    print(f"nemocompile serve --http: {runtime.name} ({', '.join(runtime.modes)}) on {runtime.backend.name}; "
          f"listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
