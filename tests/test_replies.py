"""qwen_jax.replies, with hand-computed expectations."""

from __future__ import annotations

import pytest

from qwen_jax.replies import apply_until, split_reasoning


@pytest.mark.parametrize(
    ("text", "until", "expected"),
    [
        ("The answer is 4.\n\nQuestion: next", ["\n\n", "Question:"], "The answer is 4."),
        ("The answer is 4.\n\nQuestion: next", ["Question:", "\n\n"], "The answer is 4."),
        # Earliest occurrence wins, whatever the list order.
        ("a STOP b END c", ["END", "STOP"], "a "),
        ("a STOP b END c", ["STOP", "END"], "a "),
        # The stop string is removed, and only the text before its first occurrence is kept.
        ("x</s>y</s>z", ["</s>"], "x"),
        ("Ответ: 42<|im_end|>мусор", ["<|im_end|>"], "Ответ: 42"),
        # No stop string present: unchanged.
        ("nothing to cut", ["###"], "nothing to cut"),
        # Empty stop strings are ignored (lm-eval skips them).
        ("keep all", ["", ""], "keep all"),
        ("cut here|rest", ["", "|"], "cut here"),
        # A stop string at position 0 leaves nothing.
        ("\n\nanswer", ["\n\n"], ""),
        # Overlapping stop strings: lm-eval's sequential split is order dependent.
        ("abc", ["bc", "ab"], "a"),
        ("abc", ["ab", "bc"], ""),
        # A single string is one stop string, not a list of characters.
        ("a-b", "-b", "a"),
        ("ab-", "-b", "ab-"),
        # None or [] means no stop strings.
        ("abc", None, "abc"),
        ("abc", [], "abc"),
        ("", ["x"], ""),
    ],
)
def test_apply_until(text, until, expected):
    assert apply_until(text, until) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The usual Qwen3.6 completion: the prompt ended in "<think>\n".
        ("Let me think.\n</think>\n\nThe answer is 4.", ("Let me think.\n", "\n\nThe answer is 4.")),
        # Only the first </think> splits; later ones stay in the content.
        ("r1</think>c1</think>c2", ("r1", "c1</think>c2")),
        # A leading <think> (old templates) is stripped.
        ("<think>\nreason\n</think>\n\nanswer", ("\nreason\n", "\n\nanswer")),
        # Text before a <think> is dropped, as vLLM does.
        ("junk<think>r</think>c", ("r", "c")),
        # Empty content becomes None; empty reasoning stays "".
        ("reasoning only</think>", ("reasoning only", None)),
        ("</think>answer", ("", "answer")),
        ("</think>", ("", None)),
        # No </think>: the generation was cut off while thinking, everything is reasoning.
        ("still thinking about Москва", ("still thinking about Москва", None)),
        ("<think>\nstill thinking", ("\nstill thinking", None)),
        ("", ("", None)),
        # No </think> but a genuine tool call: it ends the reasoning implicitly.
        (
            "I should call a tool.\n<tool_call>\n<function=get_weather>\n</function>\n</tool_call>",
            ("I should call a tool.\n", "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>"),
        ),
        ("<tool_call><function name='f'>", (None, "<tool_call><function name='f'>")),
        # A bare <tool_call> mention (no <function after it) does not end the reasoning.
        ("mentioning <tool_call> in passing", ("mentioning <tool_call> in passing", None)),
        # Only the first <tool_call> is examined, like vLLM.
        (
            "x <tool_call> y <tool_call>\n<function=f>",
            ("x <tool_call> y <tool_call>\n<function=f>", None),
        ),
        # With </think>, a tool call after it is plain content.
        ("r</think>\n\n<tool_call>\n<function=f>", ("r", "\n\n<tool_call>\n<function=f>")),
    ],
)
def test_split_reasoning_thinking_enabled(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # enable_thinking=False: the prompt already closed the think block; no </think> means all content.
        ("The answer is 4.", (None, "The answer is 4.")),
        ("<think>stray", (None, "stray")),
        ("", (None, "")),
        ("call\n<tool_call>\n<function=f>", (None, "call\n<tool_call>\n<function=f>")),
        # A </think> still splits.
        ("odd</think>answer", ("odd", "answer")),
    ],
)
def test_split_reasoning_thinking_disabled(text, expected):
    assert split_reasoning(text, enable_thinking=False) == expected
