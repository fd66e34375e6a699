"""The OpenAI API as clients nobody here wrote use it: the official ``openai`` SDK against
``serve --http`` (in-process, over loopback), and lm-evaluation-harness's local-completions
and local-chat-completions on small local tasks (tests/lm_eval/).

Every answer is checked against something independent: stop strings against the
unstopped temperature-0 text of the same request, log-probs against an eager PyTorch
log-softmax of the checkpoint, echoed prompt scores against the log-probs the same tokens
get when generated, lm-eval's loglikelihoods against eager scoring.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nemocompile.model.loader import load
from nemocompile.runtime import Runtime
from nemocompile.runtime.output import StopText, held_back

from test_runtime import exported

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
MODES = ["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"]
PROMPT = "def f(x):\n    return"


class Server:
    """``create_app`` on uvicorn in a thread, on a free loopback port."""

    def __init__(self, runtime):
        import uvicorn

        from nemocompile.runtime.serve.http import create_app

        self.runtime = runtime
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(runtime), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)
        self.model = runtime.name

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def server(artifact):
    with Runtime.load(artifact, threads=1) as rt:
        s = Server(rt)
        yield s
        s.close()


@pytest.fixture(scope="module")
def eager(artifact):
    """The checkpoint the artifact came from, in eager PyTorch."""
    import torch

    torch.set_num_threads(1)
    return load(json.loads((artifact / "manifest.json").read_text())["source"])


def eager_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax [len(ids), V] of one causal pass over ``ids``."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()
    return torch.log_softmax(logits, -1).numpy()


def complete(server, **kw):
    return server.client.completions.create(model=server.model, prompt=kw.pop("prompt", PROMPT), **kw)


def streamed(server, **kw) -> tuple[str, str | None]:
    """The concatenated text of a completion stream and its finish reason."""
    text, finish = "", None
    for chunk in complete(server, stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish


# ---- stop -----------------------------------------------------------------------------------
def test_stop_text_holds_back_what_could_begin_a_stop_string(artifact):
    """A tail that may still become a stop string is never visible; text is cut at the earliest
    occurrence of any stop string, across token boundaries."""
    from nemocompile.text.tokenizer import Tokenizer

    tok = Tokenizer(artifact)
    text = StopText(tok, ["world", "wx"])
    seen = []
    for ch in "hello wow world":
        stopped = text.add(tok.encode(ch)[0])
        seen.append(text.visible)
        if stopped:
            break
    assert text.stopped and text.final() == "hello wow "
    # "w" and "wo" may begin "world": held back; "wow" cannot, but its last "w" may
    assert seen[6:9] == ["hello ", "hello ", "hello wo"]
    assert all(not v.endswith("w") for v in seen)  # never shows what could begin a stop string
    assert held_back("abcwor", ["world"]) == 3 and held_back("abc", ["world"]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_cut_where_they_first_appear_in_every_mode(server, mode):
    """The stopped text is the unstopped temperature-0 text up to the first occurrence of the
    stop string (multi-character: it spans tokens, and falls inside committed blocks), never
    leaked in a stream; the list form and a string that never appears change nothing else."""
    kw = dict(max_tokens=24, extra_body={"mode": mode, "ignore_eos": True})
    full = complete(server, **kw).choices[0]
    assert full.finish_reason == "length" and len(full.text) >= 12, full.text
    for start in (2, 7, 11):
        stop = full.text[start:start + 3]
        cut = full.text[:full.text.find(stop)]
        got = complete(server, stop=[stop, "~~~~"], **kw).choices[0]
        assert (got.text, got.finish_reason) == (cut, "stop"), (stop, full.text)
        # the row ended at the token that completed the stop string
        assert server.runtime.tokenizer.decode(got.tokens) == cut + stop
        assert streamed(server, stop=stop, **kw) == (cut, "stop")
    assert complete(server, stop="~~~~", **kw).choices[0].text == full.text


def test_stop_token_ids_ignore_eos_and_min_tokens(server):
    base = complete(server, max_tokens=20, extra_body={"ignore_eos": True}).choices[0]
    ids = base.tokens
    target = ids[6]
    first = ids.index(target)
    got = complete(server, max_tokens=20, extra_body={"ignore_eos": True, "stop_token_ids": [target]}).choices[0]
    assert got.tokens == ids[:first + 1] and got.finish_reason == "stop"
    # the configured EOS stops; ignore_eos goes on past it
    eos_run = complete(server, max_tokens=20, extra_body={"eos": target}).choices[0]
    assert eos_run.tokens == ids[:first + 1] and eos_run.finish_reason == "stop"
    # min_tokens: no stop before that many tokens (the first occurrence is passed over)
    later = [i for i, t in enumerate(ids) if t == ids[0] and i >= 3]
    got = complete(server, max_tokens=20, extra_body={"ignore_eos": True, "stop_token_ids": [ids[0]],
                                                      "min_tokens": 3}).choices[0]
    assert got.tokens == (ids[:later[0] + 1] if later else ids)
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        complete(server, max_tokens=2, extra_body={"min_tokens": 5})
    with pytest.raises(openai.BadRequestError, match="stop takes at most 4"):
        complete(server, stop=["a", "b", "c", "d", "e"])


def test_runtime_and_stdio_take_the_same_stop(server, artifact):
    from nemocompile.runtime.serve.stdio import serve_stdio

    rt = server.runtime
    full = rt.generate(PROMPT, max_new_tokens=20, ignore_eos=True).text
    stop = full[5:8]
    cut = full[:full.find(stop)]
    r = rt.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stop=stop)
    assert (r.text, r.finish_reason) == (cut, "stop")
    chunks = [rt.tokenizer.decode(t) for t in rt.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stop=[stop],
                                                          stream=True)]
    assert "".join(chunks).startswith(cut)
    out = io.StringIO()
    lines = [json.dumps({"id": 1, "prompt": PROMPT, "max_new_tokens": 20, "ignore_eos": True, "stop": [stop],
                         "stream": True}).encode() + b"\n"]
    assert serve_stdio(rt, stdin=io.BytesIO(b"".join(lines)), stdout=out) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[-1]["text"] == cut and events[-1]["finish_reason"] == "stop"
    assert "".join(e["text"] for e in events if e.get("event") == "tokens") == cut


# ---- log-probabilities ---------------------------------------------------------------------
def test_completion_logprobs_are_the_models_and_the_chosen_token_is_its_own_alternative(server, eager):
    got = complete(server, max_tokens=10, logprobs=3, extra_body={"ignore_eos": True}).choices[0]
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value == max(top.values())  # greedy: the same float, the best one
        assert len(top) == 3
    # tokens as text, special ones included (the text skips them: a random model emits EOS ids)
    assert "".join(lp.tokens).replace("</s>", "") == got.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(10)]
    # the model's own log-softmax (temperature 1), from an eager pass over prompt + output
    prompt = server.runtime.tokenizer.encode(PROMPT)
    ref = eager_logprobs(eager, prompt + got.tokens)
    want = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(got.tokens)]
    assert np.abs(np.array(lp.token_logprobs) - want).max() < 1e-4
    # streamed chunks carry the same values
    values = [v for chunk in complete(server, max_tokens=10, logprobs=3, stream=True,
                                      extra_body={"ignore_eos": True})
              for c in chunk.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == lp.token_logprobs


@pytest.mark.parametrize("mode", ["linear-spec", "quadratic-spec", "auto", "diffusion"])
def test_logprobs_in_every_mode(server, mode):
    """Lossless modes emit AR's tokens with AR's log-probs (from verify/fused rows instead of
    ar_step: equal to float tolerance); diffusion reports the distribution each token was
    decided from, the chosen token still its own best alternative at temperature 0."""
    kw = dict(max_tokens=12, logprobs=2, extra_body={"ignore_eos": True, "mode": mode})
    got = complete(server, **kw).choices[0].logprobs
    for token, value, top in zip(got.tokens, got.token_logprobs, got.top_logprobs):
        assert top[token] == value == max(top.values())
    if mode != "diffusion":
        ar = complete(server, **{**kw, "extra_body": {"ignore_eos": True}}).choices[0].logprobs
        assert got.tokens == ar.tokens
        assert np.abs(np.array(got.token_logprobs) - ar.token_logprobs).max() < 1e-4


def test_chat_logprobs(server):
    kw = dict(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    got = server.client.chat.completions.create(**kw).choices[0]
    content = got.logprobs.content
    assert "".join(c.token for c in content).replace("</s>", "") == got.message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
        assert c.top_logprobs[0].token == c.token and bytes(c.bytes).decode() == c.token
    chunks = [ch for ch in server.client.chat.completions.create(stream=True, **kw)]
    streamed_lp = [c.logprob for ch in chunks for choice in ch.choices if choice.logprobs
                   for c in choice.logprobs.content]
    # the second request reuses the first one's prompt (the prefix cache): equal to fp32 tolerance
    assert streamed_lp == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = server.client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == got.message.content


# ---- echo: prompt scoring --------------------------------------------------------------------
def test_echo_scores_the_prompt_as_generation_would(server, eager):
    """A prompt token's echoed log-prob equals the log-prob it got when generated from the same
    prefix; the prompt spans several prefill chunks (with one token of lookahead each)."""
    tok = server.runtime.tokenizer
    prompt = tok.encode(PROMPT)
    gen = complete(server, prompt=prompt, max_tokens=10, logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    scored = complete(server, prompt=prompt + gen.tokens, max_tokens=0, echo=True, logprobs=2).choices[0]
    lp = scored.logprobs
    assert scored.text == PROMPT + gen.text and len(lp.token_logprobs) == len(prompt) + 10
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert np.abs(np.array(lp.token_logprobs[len(prompt):]) - gen.logprobs.token_logprobs).max() < 1e-4
    for top, want in zip(lp.top_logprobs[len(prompt):], gen.logprobs.top_logprobs):
        assert top.keys() == want.keys()
    ref = eager_logprobs(eager, prompt + gen.tokens)
    ids = prompt + gen.tokens
    assert np.abs(np.array(lp.token_logprobs[1:]) - [ref[i, ids[i + 1]] for i in range(len(ids) - 1)]).max() < 1e-4
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[max(top, key=top.get)] == max(top.values()) and value <= max(top.values())
    # lm-eval's loglikelihood request: [[ids]], max_tokens 1, logprobs 1, echo
    one = complete(server, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0).choices[0]
    assert one.logprobs.token_logprobs[:len(ids)] == lp.token_logprobs and len(one.logprobs.tokens) == len(ids) + 1
    # and streamed: the prompt's text and scores first
    chunks = list(complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=2, stream=True))
    values = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert "".join(c.text for ch in chunks for c in ch.choices) == tok.decode(ids) and values == lp.token_logprobs


# ---- choices, shapes, endpoints ------------------------------------------------------------
def test_n_best_of_and_lists_of_prompts(server):
    kw = dict(max_tokens=8, temperature=0.8, seed=11, extra_body={"ignore_eos": True})
    two = complete(server, n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
    assert [c.text for c in complete(server, n=2, **kw).choices] == [c.text for c in two.choices]  # seeded
    assert complete(server, **kw).choices[0].text == two.choices[0].text  # choice 0 is the n=1 stream
    texts = {0: "", 1: ""}
    for chunk in complete(server, n=2, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in two.choices]
    batch = complete(server, prompt=[PROMPT, "x = 1"], n=2, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices[:2]] == [c.text for c in two.choices]
    assert batch.usage.completion_tokens == 32
    sampled = complete(server, logprobs=5, **kw).choices[0].logprobs
    for token, value, top in zip(sampled.tokens, sampled.token_logprobs, sampled.top_logprobs):
        assert top[token] == value  # a sampled token too: its value is its entry among the alternatives
    three = complete(server, n=3, logprobs=0, **kw).choices
    best = complete(server, best_of=3, logprobs=0, **kw).choices
    totals = [sum(c.logprobs.token_logprobs) for c in three]
    assert len(best) == 1 and best[0].text == three[int(np.argmax(totals))].text
    chat = server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                                 n=2, **kw)
    assert [c.index for c in chat.choices] == [0, 1]


def test_the_shapes_clients_send(server):
    """null means the default for every optional field; metadata a local model has no use for
    is accepted and ignored."""
    base = {"model": server.model, "prompt": PROMPT, "max_tokens": 6}
    want = httpx.post(f"{server.url}/v1/completions", json=base).json()["choices"][0]["text"]
    nulls = {k: None for k in ("n", "top_p", "presence_penalty", "frequency_penalty", "best_of", "echo", "stream",
                               "logprobs", "stop", "seed", "temperature", "logit_bias", "suffix", "user")}
    meta = {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k",
            "safety_identifier": "s", "user": "u"}
    r = httpx.post(f"{server.url}/v1/completions", json={**base, **nulls, **meta})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    chat = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "reasoning_effort": "low", "verbosity": "low", "modalities": ["text"], "top_logprobs": None,
            "logprobs": None, **meta}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat).status_code == 200
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "modalities": ["audio"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "modalities"
    # the SDK's own calls with its optional arguments
    assert server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, n=1, echo=False,
                                            user="u", stream=False).choices[0].text == want


def test_what_cannot_be_honoured_is_refused_in_one_line(server, monkeypatch):
    with pytest.raises(openai.BadRequestError, match="quadratic-spec fuses"):
        complete(server, max_tokens=0, echo=True, logprobs=1, extra_body={"mode": "quadratic-spec"})
    with pytest.raises(openai.BadRequestError, match="best_of > n cannot stream"):
        complete(server, best_of=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="'best_of' \\(1\\) must be at least 'n' \\(2\\)"):
        complete(server, best_of=1, n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs must be an integer from 0 to 20"):
        complete(server, logprobs=21)
    monkeypatch.setattr(server.runtime, "logprobs", False)  # as an artifact exported with --no-logprobs
    with pytest.raises(openai.BadRequestError, match="--no-logprobs"):
        complete(server, logprobs=1)
    assert complete(server, max_tokens=3).choices[0].logprobs is None  # the rest still serves


def test_a_no_logprobs_plan_has_no_logprob_outputs():
    from nemocompile.graphs import plan

    lean = [s for s, _ in plan(["ar", "quadratic-spec"], block_length=4, prefill_length=8, has_lora=False,
                               logprobs=False)]
    full = [s for s, _ in plan(["ar", "quadratic-spec"], block_length=4, prefill_length=8, has_lora=False)]
    assert not any(getattr(s, "logprobs", False) or getattr(getattr(s, "causal", None), "logprobs", False)
                   for s in lean)
    assert all(s.logprobs if hasattr(s, "logprobs") else s.causal.logprobs for s in full)


def test_endpoints(server):
    assert server.client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError) as e:
        server.client.models.retrieve("other")
    assert e.value.body["type"] == "model_not_found"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi there", "add_special_tokens": False}).json()
    assert tok["tokens"] == server.runtime.tokenizer.encode("hi there") and tok["count"] == 8
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hi there"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert server.runtime.tokenizer.decode(chat["tokens"]) == "<user>hi\n<assistant>"
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and "<assistant>" in info["chat_template"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}).status_code == 400


# ---- lm-evaluation-harness ---------------------------------------------------------------------
def _lm_eval(server, model: str, tasks: list[str], model_args: str, **kw) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval")),
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                   **kw)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository


@pytest.mark.parametrize("backend", ["auto", "huggingface"])
def test_lm_eval_local_completions(server, eager, offline, artifact, backend):
    """generate_until and multiple_choice through local-completions, with the server's own
    tokenizer endpoints (tokenizer_backend auto finds them) or the artifact's tokenizer files
    (huggingface); the loglikelihoods equal eager PyTorch scoring of the same prompts."""
    args = f"model={server.model},base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1"
    tasks = ["tiny_gen", "tiny_choice"]
    batch = 1
    if backend == "huggingface":  # and batches of 2: a list of prompts per request, one choice each
        args += f",tokenizer_backend=huggingface,tokenizer={artifact}"
        tasks, batch = ["tiny_choice"], 2
    out = _lm_eval(server, "local-completions", tasks, args, batch_size=batch)
    assert 0 <= out["results"]["tiny_choice"]["acc,none"] <= 1
    tok = server.runtime.tokenizer
    checked = 0
    for sample in out["samples"]["tiny_choice"]:
        for args_, resp in zip(sample["arguments"], sample["resps"]):
            context, continuation = args_[0], args_[1]
            ids = tok.encode(context + continuation)  # characters: the split does not change the ids
            n = len(tok.encode(continuation))
            ref = eager_logprobs(eager, ids)
            want = sum(ref[i - 1, ids[i]] for i in range(len(ids) - n, len(ids)))
            assert abs(resp[0][0] - want) < 1e-4, (context, continuation, resp, want)
            checked += 1
    assert checked >= 6
    for sample in out["samples"].get("tiny_gen", []):
        text = sample["resps"][0][0]
        assert isinstance(text, str) and "\n" not in text and "." not in text  # cut at its `until`
    if backend == "auto":
        assert 0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1


def test_lm_eval_local_chat_completions(server, offline):
    args = f"model={server.model},base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1"
    out = _lm_eval(server, "local-chat-completions", ["tiny_gen"], args, apply_chat_template=True)
    assert 0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1
    assert len(out["samples"]["tiny_gen"]) == 4

