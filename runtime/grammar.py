"""Structured output: OpenAI's ``response_format`` by constrained decoding (xgrammar).

``json_object`` compiles xgrammar's built-in JSON grammar, ``json_schema`` the
request's schema. Each row keeps a matcher; before every choice its token mask
(the tokens the grammar allows next, EOS once the value is complete) is applied to
the logits (``Row.distribution``: -inf outside the mask, then the request's
sampling), and every emitted token advances it. The mask needs the state after each
earlier token: ar and auto (whose rows with a grammar run ar cycles) mask each token;
self-speculation masks each verify position with the state after the drafts before it
(``Row.verify``: the matcher advances over the accepted drafts, then rolls back), so a
draft the grammar forbids is rejected. Block diffusion decides tokens out of order and
refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from nemocompile.text.request import RequestError

MODES = ("ar", "linear-spec", "quadratic-spec", "auto")  # the modes that apply a grammar's mask


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise RequestError("response_format needs the xgrammar package: pip install 'nemocompile[structured]'",
                           param="response_format") from None
    return xgrammar


def tokenizer_info(runtime):
    """xgrammar's view of the artifact's vocabulary (built once per runtime): each id's token
    string; special tokens are empty (never allowed inside a value) and the vocabulary is
    padded to the model's size."""
    if getattr(runtime, "_xgr_tokenizer_info", None) is None:
        xgr = _xgrammar()
        tok = runtime.tokenizer
        if tok is None:
            raise RequestError("response_format needs the artifact's tokenizer.json", param="response_format")
        spec = json.loads((tok.directory / "tokenizer.json").read_text())
        vocab = [""] * runtime.vocab_size
        for token, i in tok._tok.get_vocab(with_added_tokens=True).items():
            if i < runtime.vocab_size:
                vocab[i] = token
        for added in spec.get("added_tokens", []):
            if added.get("special") and added["id"] < runtime.vocab_size:
                vocab[added["id"]] = ""
        runtime._xgr_tokenizer_info = xgr.TokenizerInfo(vocab, _vocab_type(spec, xgr), vocab_size=runtime.vocab_size,
                                                        stop_token_ids=list(runtime.eos_token_ids))
        runtime._xgr_compiler = xgr.GrammarCompiler(runtime._xgr_tokenizer_info, max_threads=1)
    return runtime._xgr_compiler


def _vocab_type(spec: dict, xgr):
    """How token strings map to bytes, from tokenizer.json's decoder (and the BPE model's byte fallback)."""
    decoders = [spec.get("decoder") or {}]
    if decoders[0].get("type") == "Sequence":
        decoders = decoders[0].get("decoders", [])
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds or (spec.get("model") or {}).get("byte_fallback"):
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


@dataclass(frozen=True)
class Grammar:
    """A request's compiled grammar; ``matcher()`` gives each row its own state."""

    compiled: object  # xgrammar.CompiledGrammar
    stop: tuple[int, ...]  # the request's EOS ids (empty: the value's end stops the row)
    vocab_size: int

    def matcher(self) -> "RowGrammar":
        return RowGrammar(self)


class RowGrammar:
    """One row's grammar state: ``allowed()`` the mask for the next token, ``accept`` a token."""

    def __init__(self, grammar: Grammar):
        xgr = _xgrammar()
        self.vocab_size = grammar.vocab_size
        self.matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=list(grammar.stop) or None,
                                          terminate_without_stop_token=not grammar.stop)
        self.bitmask = np.zeros(xgr.get_bitmask_shape(1, grammar.vocab_size), dtype=np.int32)
        self.accepted = 0  # tokens the matcher holds (what a rollback may undo)

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (any, once it has ended: nothing after
        the stop token is kept)."""
        if self.matcher.is_terminated():
            return np.ones(self.vocab_size, dtype=bool)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.accepted += bool(self.matcher.accept_token(int(token)))

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (a verify's look-ahead)."""
        n = min(n, self.accepted)
        if n:
            self.matcher.rollback(n)
            self.accepted -= n

    @property
    def finished(self) -> bool:
        """The value is complete and its stop token (or, without EOS ids, its end) was emitted."""
        return self.matcher.is_terminated()


TOOL_CALL = "tool_call"  # nemocompile's own format: the chat API's tool_choice "required" or a named tool


def tool_call_grammar(tools):
    """One Hermes call ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`` to one of
    ``tools`` (OpenAI's function objects), its arguments following the tool's parameters schema."""
    xgr = _xgrammar()
    if not isinstance(tools, list) or not tools:
        raise RequestError("a forced tool call needs the tools to choose from", param="tool_choice")
    calls = []
    for tool in tools:
        f = tool["function"]
        schema = {"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False}
        try:
            body = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:
            raise RequestError(f"tool {f['name']!r:.40}: its parameters schema cannot be compiled: "
                               f"{str(e).splitlines()[0]:.200}", param="tools") from None
        calls.append(xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'), body,
                                        xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"')))
    return xgr.Grammar.union(*calls) if len(calls) > 1 else calls[0]


def compile_response_format(runtime, response_format, mode: str, eos: frozenset[int]) -> Grammar | None:
    """The grammar of OpenAI's ``response_format`` (None for ``{"type": "text"}``); a format
    that cannot run raises a one-line RequestError."""
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise RequestError("response_format must be an object with a 'type': text, json_object or json_schema",
                           param="response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema", TOOL_CALL):
        raise RequestError(f"response_format type {kind!r:.40} is not supported; use text, json_object or "
                           "json_schema", param="response_format")
    if mode not in MODES:
        raise RequestError(f"response_format needs each token's grammar state, which {mode} (tokens decided out of "
                           f"order) cannot give: use mode {', '.join(MODES[:-1])} or auto", param="response_format")
    compiler = tokenizer_info(runtime)
    if kind == "json_object":
        compiled = compiler.compile_builtin_json_grammar()
    elif kind == TOOL_CALL:
        compiled = compiler.compile_grammar(tool_call_grammar(response_format.get("tools")))
    else:
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise RequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                               param="response_format")
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                    strict_mode=bool(spec.get("strict", True)))
        except Exception as e:  # xgrammar raises its own errors (and RuntimeError) for schemas it cannot compile
            raise RequestError(f"response_format json_schema cannot be compiled: {str(e).splitlines()[0]:.200}",
                               param="response_format") from None
    return Grammar(compiled, tuple(sorted(eos)), runtime.vocab_size)
