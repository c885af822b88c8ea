"""Post-processing of generated text, as lm-evaluation-harness and a vLLM server do it.

* :func:`apply_until` cuts a completion at its stop strings the way lm-evaluation-harness does for
  ``generate_until`` requests.
* :func:`split_reasoning` separates reasoning from the answer the way vLLM's OpenAI server does with
  ``--reasoning-parser qwen3``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["apply_until", "split_reasoning"]

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
_FUNCTION_OPEN = re.compile(r"<function[\s=]")


def apply_until(text: str, until: Iterable[str] | str | None) -> str:
    """Cut ``text`` at its stop strings, as lm-evaluation-harness does for ``generate_until``.

    lm-eval runs ``for term in until: if len(term) > 0: s = s.split(term)[0]``: each non-empty stop string in
    turn cuts the text at its first occurrence, and the stop string itself is dropped. That is the cut at the
    earliest occurrence of any stop string, except when two stop strings overlap: cutting at an earlier
    term in the list first can break an occurrence of a later one (``apply_until("abc", ["bc", "ab"])`` is
    ``"a"``), and this function keeps lm-eval's order-dependent result. A single string is one stop string;
    ``None`` or an empty list leaves the text unchanged.
    """
    if until is None:
        return text
    if isinstance(until, str):
        until = [until]
    for term in until:
        if len(term) > 0:
            text = text.split(term)[0]
    return text


def split_reasoning(text: str, enable_thinking: bool = True) -> tuple[str | None, str | None]:
    """Split a completion into ``(reasoning, content)`` as vLLM's ``qwen3`` reasoning parser does.

    This follows the non-streaming ``Qwen3ReasoningParser.extract_reasoning`` of vLLM
    (``vllm/reasoning/qwen3_reasoning_parser.py`` at commit 00a4c6a1d828, the Qwen3.5/3.6-aware version, whose
    chat template opens ``<think>`` in the prompt so the completion starts inside the think block):

    1. If ``<think>`` occurs, everything up to and including its first occurrence is dropped (the old
       Qwen3 templates let the model write ``<think>`` itself).
    2. If ``</think>`` occurs, reasoning is the text before its first occurrence and content the text after
       it; empty content becomes ``None`` (reasoning stays a string, possibly empty).
    3. Without ``</think>`` and with ``enable_thinking=False`` (the request's chat-template kwarg): ``(None,
       text)``, all content.
    4. Without ``</think>`` and thinking enabled (the default): if a ``<tool_call>`` is followed, after
       optional whitespace, by ``<function=`` (or ``<function`` and whitespace), that tool call ends the
       reasoning implicitly: ``(text before it or None, text from it on or None)``. Otherwise the output was
       cut off while thinking and everything is reasoning: ``(text, None)``.

    No whitespace is stripped: the template's ``<think>\\n`` leaves a leading newline inside the reasoning,
    and content usually begins with ``\\n\\n``, exactly as vLLM returns them. Older vLLM releases
    (before the Qwen3.5 rewrite) returned ``(None, text)`` whenever ``</think>`` was missing; that is not
    what this function does.
    """
    _, start, after = text.partition(THINK_START)
    if start:
        text = after
    if THINK_END in text:
        reasoning, _, content = text.partition(THINK_END)
        return reasoning, content or None
    if not enable_thinking:
        return None, text
    index = text.find(TOOL_CALL_START)
    if index != -1 and _FUNCTION_OPEN.match(text[index + len(TOOL_CALL_START) :].lstrip()):
        return text[:index] or None, text[index:] or None
    return text, None
