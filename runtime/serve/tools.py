"""Tool calling for the chat API: OpenAI's ``tools`` / ``tool_choice`` and ``tool_calls`` messages.

The tools reach the checkpoint's chat template (its ``tools`` variable, as
transformers renders it); the model answers a call in the Hermes format the
embedded template teaches, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
which :func:`parse_tool_calls` turns into ``message.tool_calls`` (``finish_reason``
"tool_calls"). ``tool_choice`` "required" or a named function constrains the answer to
one such call (runtime/grammar.py's ``tool_call`` grammar). History in OpenAI's shape is accepted: assistant messages with
``content: null`` and ``tool_calls`` (their JSON-string ``arguments`` become objects
for the template) and ``tool``-role results.
"""

from __future__ import annotations

import json
import re
import uuid

from nemocompile.text.request import RequestError

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def check_tools(tools, tool_choice) -> tuple[list[dict] | None, list[dict] | None]:
    """The tools to render (None: none, or ``tool_choice`` "none") and, for ``tool_choice``
    "required" or a named function, the tools one of which the answer must call (its grammar:
    runtime/grammar.py). One-line errors for bad shapes."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs 'tools'", param="tool_choice")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise RequestError("tools must be a list of {'type': 'function', 'function': {'name', 'description', "
                           "'parameters'}} objects", param="tools")
    if tool_choice in (None, "auto"):
        return tools or None, None
    if tool_choice == "none":
        return None, None
    if tool_choice == "required":
        return tools, tools
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise RequestError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                           "{'name': <one of the tools>}}", param="tool_choice")
    return tools, named


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI history as chat templates read it: a tool call's JSON-string ``arguments`` as an object."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant" or not isinstance(calls, list):
                raise RequestError("'tool_calls' must be a list on an assistant message", param="messages")
            fixed = []
            for c in calls:
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise RequestError("each tool call needs {'function': {'name', 'arguments'}}", param="messages")
                args = f.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args or "{}")
                    except json.JSONDecodeError:
                        raise RequestError(f"tool call {f['name']!r:.40}: 'arguments' is not JSON",
                                           param="messages") from None
                fixed.append({**c, "function": {**f, "arguments": args}})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """The message's content (None when only calls remain) and its tool calls in OpenAI's
    shape; a ``<tool_call>`` block that is not a JSON call stays in the content."""
    calls, kept, last = [], [], 0
    for match in CALL.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
        kept.append(text[last:match.start()])
        last = match.end()
    if not calls:
        return text, []
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def chat_tools(body: dict, messages: list[dict], kwargs: dict) -> tuple[list[dict] | None, list[dict], dict | None]:
    """A chat request's tools: the tools rendered (None: none), the messages as the template reads
    them, and the template keywords (``chat_template_kwargs`` plus ``tools``). A forced call
    (``tool_choice`` "required" or named) sets ``kwargs["response_format"]`` to its grammar."""
    tools, forced = check_tools(body.get("tools"), body.get("tool_choice"))
    if forced:
        if kwargs.get("response_format") is not None:
            raise RequestError("tool_choice 'required' or a named tool cannot be combined with response_format",
                               param="tool_choice")
        kwargs["response_format"] = {"type": "tool_call", "tools": forced}
    template_kwargs = body.get("chat_template_kwargs")
    if tools:
        template_kwargs = {**(template_kwargs if isinstance(template_kwargs, dict) else {}), "tools": tools}
    return tools, template_messages(messages), template_kwargs


def assistant_message(text: str, finish_reason: str, tools) -> tuple[dict, str]:
    """The chat answer and its finish reason: ``tool_calls`` parsed from the text when tools were given."""
    content, calls = parse_tool_calls(text) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def stream_delta(message: dict) -> dict:
    """A whole assistant message as one stream delta (each tool call with its ``index``)."""
    delta = {k: v for k, v in message.items() if v is not None}
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
    return delta
