"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import json
import shutil

import pytest

from nemocompile.errors import CheckpointError, GenerationError
from nemocompile.model.loader import embedded_model_dir
from nemocompile.text.tokenizer import Tokenizer, encode_prompts

# A reasoning model's ChatML template (Qwen3-style): reasoning_content, <think> splitting,
# namespace + reversed loop to find the last user turn, loop controls, enable_thinking.
THINKING = """{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- if message.role == 'user' %}{%- set ns.last_user = messages|length - 1 - loop.index0 %}{% break %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'system' and not loop.first %}{% continue %}{%- endif %}
{%- if message.role == 'assistant' %}
{%- set content = message.content %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_user and reasoning %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

# Tools as JSON (tojson must not escape HTML or non-ASCII), tool calls, tool results,
# today's date and the special tokens of tokenizer_config.json.
TOOLS = """{{- bos_token if bos_token is defined else '' }}
{%- if tools %}<|system|>Today is {{ strftime_now('%Y-%m-%d') }}. Tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{{ eos_token }}
{% endif %}
{%- for message in messages %}
{%- if message.tool_calls is defined %}<|assistant|>
{%- for call in message.tool_calls %}<call>{{ call.function | tojson(indent=2, sort_keys=true) }}</call>{% endfor %}
{{ eos_token }}
{% elif message.role == 'tool' %}<|tool|>{{ message.content | tojson }}{{ eos_token }}
{% else %}<|{{ message.role }}|>{{ message.content }}{{ eos_token }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

# Refuses conversations whose roles do not alternate user/assistant.
STRICT = """{%- for message in messages %}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{{- '[' + message.role|upper + '] ' + message.content|trim + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '[ASSISTANT] ' }}{% endif %}"""

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3 <b>?</b>"}]
REASONING = CHAT[:2] + [{"role": "assistant", "content": "4", "reasoning_content": "add them", "name": None}]
TOOL_SPEC = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für <city> & co",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
             {"role": "tool", "content": "{\"temp\": \"12°C\"}"}]


def checkpoint_dir(tmp_path, template: str | None = None, config_template=None):
    """Tokenizer files of the embedded model with ``template`` as chat_template.jinja
    and/or ``config_template`` as tokenizer_config.json's chat_template."""
    d = tmp_path / "tok"
    d.mkdir()
    src = embedded_model_dir()
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    cfg["bos_token"] = {"content": "<|system|>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True, "__type": "AddedToken"}
    if config_template is not None:
        cfg["chat_template"] = config_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return d


def both(directory):
    transformers = pytest.importorskip("transformers", minversion="5")
    return Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


CASES = [
    ("thinking", THINKING, CHAT, {}, None),
    ("thinking", THINKING, CHAT, {"enable_thinking": True}, None),
    ("thinking", THINKING, CHAT, {"enable_thinking": False}, None),
    ("thinking", THINKING, REASONING, {"enable_thinking": False}, None),
    ("tools", TOOLS, TOOL_CHAT, {}, TOOL_SPEC),
    ("tools", TOOLS, CHAT[1:], {}, None),
    ("strict", STRICT, CHAT[1:], {}, None),
]


@pytest.mark.parametrize("name, template, messages, kwargs, tools", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(tmp_path, name, template, messages, kwargs, tools, add_generation_prompt):
    ours, theirs = both(checkpoint_dir(tmp_path, template))
    want = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                      tokenize=False, **kwargs)
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == want
    assert ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    tokenize=True, **kwargs) == ours.encode(want)


def test_thinking_flag_changes_the_prompt(tmp_path):
    ours = Tokenizer(checkpoint_dir(tmp_path, THINKING))
    on = ours.apply_chat_template(CHAT, enable_thinking=True)
    off = ours.apply_chat_template(CHAT, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"


def test_raise_exception_is_one_clear_error(tmp_path):
    ours, theirs = both(checkpoint_dir(tmp_path, STRICT))
    bad = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(GenerationError, match="the chat template refused this chat: Conversation roles must alternate"):
        ours.apply_chat_template(bad)


def test_named_templates_in_tokenizer_config(tmp_path):
    named = [{"name": "default", "template": STRICT}, {"name": "tool_use", "template": TOOLS}]
    ours, theirs = both(checkpoint_dir(tmp_path, config_template=named))
    msgs = CHAT[1:2]
    for tools in (None, TOOL_SPEC):
        assert ours.apply_chat_template(msgs, tools=tools) == theirs.apply_chat_template(
            msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(msgs, chat_template="tool_use").startswith("<|system|><|user|>")
    with pytest.raises(GenerationError, match="no chat template named 'nope'"):
        ours.apply_chat_template(msgs, chat_template="nope")


def test_jinja_file_wins_over_tokenizer_config(tmp_path):
    ours, theirs = both(checkpoint_dir(tmp_path, STRICT, config_template=TOOLS))
    assert ours.chat_template == STRICT
    assert ours.apply_chat_template(CHAT[1:2]) == theirs.apply_chat_template(
        CHAT[1:2], add_generation_prompt=True, tokenize=False)


def test_template_kwargs_need_a_chat_and_no_template_is_clear(tmp_path):
    tok = Tokenizer(checkpoint_dir(tmp_path, THINKING))
    ids, _ = encode_prompts(tok, tok.vocab_size, "hi", chat=True, template_kwargs={"enable_thinking": False})
    assert tok.decode(ids[0], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(GenerationError, match="only apply to chats"):
        encode_prompts(tok, tok.vocab_size, "hi", template_kwargs={"enable_thinking": False})
    with pytest.raises(GenerationError, match="must be an object"):
        encode_prompts(tok, tok.vocab_size, "hi", chat=True, template_kwargs=["enable_thinking"])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "tok" / "tokenizer.json", bare / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no chat template"):
        Tokenizer(bare).apply_chat_template("hi")
