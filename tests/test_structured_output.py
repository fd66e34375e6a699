"""Structured output (response_format by xgrammar's token mask) and tool calls, through the
runtime and through the real `openai` SDK against the HTTP app."""

from __future__ import annotations

import json

import pytest

from nemocompile.text.request import RequestError

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string", "maxLength": 8}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def rt(embedded_dir, tmp_path_factory):
    """The embedded model's ar graphs with room for a chat that lists tools (its tiny
    tokenizer spends ~200 tokens on one tool's JSON)."""
    from nemocompile.graphs.export import export_artifact
    from nemocompile.runtime import Runtime

    out = tmp_path_factory.mktemp("structured") / "embedded_ar"
    export_artifact(None, out, modes=["ar"], max_seq_len=512, prefill_length=32)
    with Runtime.load(out, threads=1) as runtime:
        yield runtime


CHAT = [{"role": "user", "content": "Give me a JSON object."}]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schema_outputs_parse_and_validate(rt, temperature, mode="ar"):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        r = rt.generate(CHAT, chat=True, mode=mode, max_new_tokens=80, temperature=temperature, seed=seed,
                        response_format=fmt)
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_self_speculation_and_auto_follow_the_grammar(embedded_dir):
    """linear-spec and quadratic-spec mask each verify position (drafts the grammar forbids
    are rejected): at temperature 0 exactly AR's constrained output; auto runs ar cycles."""
    from tiny_artifacts import embedded

    from nemocompile.runtime import Runtime

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    with Runtime.load(embedded(), threads=1) as every_mode:
        ar = every_mode.generate("Person:", mode="ar", max_new_tokens=80, response_format=fmt)
        jsonschema.validate(json.loads(ar.text), SCHEMA)
        for mode in ("linear-spec", "quadratic-spec"):
            r = every_mode.generate("Person:", mode=mode, max_new_tokens=80, response_format=fmt)
            assert r.tokens == ar.tokens, mode
            for seed in range(2):
                s = every_mode.generate("Person:", mode=mode, max_new_tokens=80, response_format=fmt,
                                        temperature=0.9, seed=seed)
                jsonschema.validate(json.loads(s.text), SCHEMA)
        r = every_mode.generate("Person:", mode="auto", max_new_tokens=80, response_format=fmt)
    assert r.tokens == ar.tokens
    assert set(r.stats.mode_mix) == {"ar"} and "response_format" in r.stats.auto_reason


def test_json_object_parses_and_unconstrained_does_not(rt):
    r = rt.generate(CHAT, chat=True, max_new_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.text), dict)
    free = rt.generate(CHAT, chat=True, max_new_tokens=60)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # the tiny model does not write JSON by itself: the mask did


def test_auto_applies_the_grammar_and_other_modes_refuse_in_one_line():
    from tiny_artifacts import lora_batch2

    from nemocompile.runtime import Runtime

    with Runtime.load(lora_batch2()[1], threads=1) as other:  # every mode, no tokenizer
        with pytest.raises(RequestError, match="diffusion .* cannot give") as e:
            other.generate([5, 6], mode="diffusion", response_format={"type": "json_object"})
        assert "\n" not in str(e.value)
        with pytest.raises(RequestError, match="tokenizer"):
            other.generate([5, 6], mode="auto", response_format={"type": "json_object"})


def test_bad_formats_are_one_line_errors(rt):
    for fmt in ({"type": "yaml"}, {"type": "json_schema"}, "json"):
        with pytest.raises(RequestError) as e:
            rt.generate("hi", response_format=fmt)
        assert e.value.param == "response_format" and "\n" not in str(e.value)


def test_parse_tool_calls():
    from nemocompile.runtime.serve.tools import parse_tool_calls

    text = 'ok <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "ok" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


# ---- the openai SDK ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(rt):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nemocompile.runtime.serve.http import create_app

    with TestClient(create_app(rt, model_name="tiny")) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)


def test_sdk_sampling_fields_and_json_schema(client):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=80, temperature=0.8, top_p=0.9,
                                         presence_penalty=0.5, frequency_penalty=0.2, logit_bias={"17": 1}, seed=3,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "person", "schema": SCHEMA}},
                                         extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    greedy = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8)
    tiny = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0.8,
                                     top_p=1e-6, seed=1)
    assert tiny.choices[0].text == greedy.choices[0].text
    import openai

    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, top_p=2)


def test_sdk_tool_calls_round_trip(client, rt, monkeypatch):
    """A call the model writes comes back as message.tool_calls with finish_reason
    tool_calls, and goes back as history. The tiny model never writes a call by itself,
    so its text is replaced by one (the decode is the test double; parsing and shaping run)."""
    call = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    monkeypatch.setattr(rt.tokenizer, "decode", lambda ids, **kw: call)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=TOOLS, max_tokens=4)
    monkeypatch.undo()
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4)
    assert again.choices[0].message.role == "assistant" and again.choices[0].finish_reason == "length"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_sdk_forced_tool_choice_calls_the_tool(client, choice):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=TOOLS, tool_choice=choice, max_tokens=120)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), TOOLS[0]["function"]["parameters"])


def test_sdk_accepts_tool_history_and_renders_tools(client, rt):
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens > 100  # the tools were rendered
    plain = client.chat.completions.create(model="tiny", messages=history[:1], max_tokens=6)
    assert plain.usage.prompt_tokens < 20
    stream = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
