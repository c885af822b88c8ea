"""Limits checked before a generation allocates anything: the prompt, the number of new tokens, the model's
context, and the memory the decode state will take.

Small pure functions; :func:`check_generation` is what :func:`qwen_jax.generate.generate` and
:func:`qwen_jax.generate.stream_generate` call, and the CLIs (``python -m qwen_jax generate``, ``python -m audit``)
call the same checks up front, before any weights are loaded.

- ``max_new_tokens`` must be at least 1;
- a prompt must hold at least one token;
- prompt tokens + ``max_new_tokens`` must fit the model's context (``max_position_embeddings`` of config.json):
  past it RoPE positions were never trained, so the run is refused rather than silently degraded;
- the decode state (:func:`qwen_jax.cache.init_decode_state`, sized by ``jax.eval_shape``, nothing allocated),
  plus the kept logits when asked for, must fit the memory still free on the device (host RAM for the CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from qwen_jax.cli_contract import BadInputError

GIB = 1024**3


class LimitError(BadInputError):
    """A generation that cannot run as asked (no tokens, past the context, more memory than there is)."""


def check_max_new_tokens(max_new_tokens, name: str = "max_new_tokens") -> int:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int | np.integer)
        or max_new_tokens < 1
    ):
        raise LimitError(f"{name} must be a positive integer, got {max_new_tokens!r}")
    return int(max_new_tokens)


def check_prompt_lengths(lengths: Sequence[int], what: str = "prompt") -> None:
    """Every prompt holds at least one token (a generation needs a last token to continue from)."""
    empty = [i for i, n in enumerate(lengths) if n < 1]
    if len(lengths) == 0 or empty:
        which = f" (row {empty[0]} of {len(lengths)})" if len(lengths) > 1 else ""
        raise LimitError(f"{what} is empty{which}: it has no tokens to continue from")


def check_context(prompt_tokens: int, max_new_tokens: int, context: int, what: str = "prompt") -> None:
    """prompt + new tokens <= the model's context (``max_position_embeddings``)."""
    if prompt_tokens + max_new_tokens > context:
        raise LimitError(
            f"{what}: {prompt_tokens} prompt tokens + {max_new_tokens} new tokens = "
            f"{prompt_tokens + max_new_tokens} exceeds the model's context of {context} tokens "
            "(max_position_embeddings in config.json); shorten the prompt or lower max_new_tokens"
        )


def decode_state_bytes(cfg, batch: int, max_length: int, dtype) -> int:
    """Bytes of the decode state :func:`qwen_jax.cache.init_decode_state` would allocate (shapes only)."""
    import jax

    from qwen_jax.cache import init_decode_state

    state = jax.eval_shape(lambda: init_decode_state(cfg, batch, max_length, dtype))
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state))


def free_memory_bytes() -> tuple[int | None, str]:
    """(bytes still free, where): the first device's allocator limit minus its use when it reports them (GPU,
    TPU), else the host's available memory (``MemAvailable``); None when neither is known."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_memory(need: int, free: int | None, where: str, what: str) -> None:
    if free is not None and need > free:
        raise LimitError(
            f"{what} needs {need / GIB:,.1f} GiB but only {free / GIB:,.1f} GiB of {where} is free; "
            "lower max_new_tokens, the prompt length or the batch"
        )


def check_generation(cfg, attention_mask, max_new_tokens, max_length: int, dtype, keep_logits: bool = False):
    """Every limit of one generation call: ``attention_mask`` [B, L] (1 for real tokens), the cache length
    ``max_length`` and the model dtype. Raises :class:`LimitError`; allocates nothing."""
    check_max_new_tokens(max_new_tokens)
    mask = np.asarray(attention_mask)
    lengths = mask.sum(-1).tolist() if mask.ndim == 2 else []
    check_prompt_lengths(lengths)
    check_context(int(max(lengths)), int(max_new_tokens), cfg.max_position_embeddings)
    batch = mask.shape[0]
    need = decode_state_bytes(cfg, batch, max_length, dtype)
    if keep_logits:
        need += batch * max_length * cfg.vocab_size * 4
    free, where = free_memory_bytes()
    check_memory(need, free, where, f"the decode state for {batch} x {max_length} tokens")
