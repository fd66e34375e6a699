"""The one place a generation request's values are checked, for every front door.

The eager decoders (``nemocompile.generate``), the runtime (``Runtime.validate``)
and through it ``run``, ``serve --stdio`` and ``serve --http`` all call
:func:`check_values` for the knobs and :func:`check_room` for lengths, so they
cannot disagree about what is valid. Errors are :class:`RequestError`: one
line naming the field (``param``) and what to do; ``names`` renames fields in
messages for a front door that spells them differently (HTTP's ``max_tokens``).
``MODES`` is the one list of decode modes (the eager decoders and the runtime read it here).
"""

from __future__ import annotations

import math
import os

from nemocompile.errors import GenerationError

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")  # the decode modes


class RequestError(GenerationError):
    """A request value that cannot run; ``param`` is the field at fault (None: the request)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_values(*, mode, max_new_tokens, block_length=None, temperature=0.0, seed=None, eos=None, steps=None,
                 vocab_size: int | None = None, names: dict[str, str] | None = None, auto: bool = False) -> None:
    """Types and ranges of the knobs every mode shares (threshold: ``parse_threshold``).
    ``auto``: the front door also takes mode "auto" (the runtime's engine)."""
    modes = (*MODES, "auto") if auto else MODES

    def name(field: str) -> str:
        return (names or {}).get(field, field)

    def fail(field: str, message: str):
        raise RequestError(message.replace("{}", name(field)), param=name(field))

    if not isinstance(mode, str) or mode not in modes:
        fail("mode", f"unknown mode {mode!r:.60}; expected one of {', '.join(modes)}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        fail("max_new_tokens", f"{{}} must be an integer >= 1, got {max_new_tokens!r:.60}")
    if block_length is not None and (not _is_int(block_length) or block_length < 1):
        fail("block_length", f"{{}} must be a positive integer, got {block_length!r:.60}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature >= 0)):
        fail("temperature", f"{{}} must be a finite number >= 0, got {temperature!r:.60}")
    if seed is not None and (not _is_int(seed) or seed < 0 or seed >= 2**63):
        fail("seed", f"{{}} must be a non-negative 64-bit integer, got {seed!r:.60}")
    if steps is not None and (not _is_int(steps) or steps < 1):
        fail("steps", f"{{}} must be an integer >= 1, got {steps!r:.60}")
    ids = list(eos) if isinstance(eos, (list, tuple, set, frozenset)) else [eos]  # any of a list stops
    if eos is not None and (not ids or any(not _is_int(t) or t < -1 or (vocab_size is not None and t >= vocab_size)
                                           for t in ids)):
        fail("eos", f"{{}} must be a token id, a list of token ids or -1 (no EOS stop), got {eos!r:.60}")


def check_room(width: int, max_new_tokens: int, block: int | None, limit: int, what: str, remedy: str,
               names: dict[str, str] | None = None, prompt: int | None = None) -> int:
    """Prompt + max_new_tokens (+ one block) must fit ``limit`` tokens; returns what is needed.
    ``width``: the slots the prompt takes; ``prompt``: its own length where padding makes it
    shorter (quadratic-spec pads a short prompt to a full prefill chunk). ``names``: the
    caller's spelling of max_new_tokens (HTTP: max_tokens), in the message and the remedy."""
    new = (names or {}).get("max_new_tokens", "max_new_tokens")
    need = width + max_new_tokens + (block or 0)
    if width > limit or need > limit:
        padded = prompt is not None and prompt != width
        tokens = f"{prompt} tokens, padded to a prefill chunk of {width}" if padded else f"{width}"
        head = (f"the prompt ({tokens}{'' if padded else ' tokens'}) alone exceeds" if width > limit else
                f"prompt ({tokens}) + {new} ({max_new_tokens})" + (f" + one block ({block})" if block else "")
                + f" = {need} tokens exceed")
        remedy = remedy.replace("max_new_tokens", new)
        raise RequestError(f"{head} {what} of {limit}; {remedy}", param=None if width > limit else new)
    return need


def check_memory(nbytes: int, what: str) -> None:
    """Refuse work whose estimated peak allocation exceeds the memory available now."""
    available = _available_memory()
    if available is not None and nbytes > available:
        raise RequestError(f"{what} needs about {nbytes / 2**30:.1f} GiB but {available / 2**30:.1f} GiB of "
                           "memory is available; lower max_new_tokens or block_length")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_eager_request(model, args, block: int, batch: int, width: int) -> None:
    """What the eager decoders cannot run: a block longer than both the tokens asked for
    and the trained block size (it would be denoised at length to keep a few), positions past the model's
    max_position_embeddings, or a cache and attention larger than the memory available."""
    cfg = model.config
    uses_block = args.mode != "ar"
    if uses_block and args.block_length is not None and args.block_length > max(args.max_new_tokens, cfg.block_size):
        # up to the trained block size is always fine; beyond it, masks far right of the few
        # tokens asked for are denoised one by one (block 1024 for 8 tokens: 988 forwards)
        raise RequestError(f"block_length {args.block_length} exceeds max_new_tokens {args.max_new_tokens} and the "
                           f"model's block_size {cfg.block_size}: most of the block would be decoded for nothing; "
                           f"use a block_length of at most {max(args.max_new_tokens, cfg.block_size)}",
                           param="block_length")
    need = check_room(width, args.max_new_tokens, block if uses_block else None, cfg.max_position_embeddings,
                      "the model's max_position_embeddings", "shorten the prompt or lower max_new_tokens")
    elem = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 4
    # query rows of the widest forward: the prefill, a block, or quadratic-spec's fused step
    rows = max(width, block if uses_block else 1)
    if args.mode == "quadratic-spec":
        rows = max(width + block, block * (block + 1))
    cache = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * need * cfg.head_dim * elem
    scores = 2 * batch * cfg.num_attention_heads * rows * need * 4  # attention scores and their softmax, fp32
    logits = batch * rows * cfg.vocab_size * 4
    check_memory(cache + scores + logits, f"this request ({need} positions, batch {batch})")
