"""qwen_jax.chat against transformers' apply_chat_template byte for byte, and its token ids against HF's.

The tokenizer is a tiny byte-level BPE trained here (no downloads), with Qwen's control tokens added.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import tiny_tokenizer

from qwen_jax.chat import ChatTemplateError, apply_chat_template, load_default_chat_template
from qwen_jax.tokenizer import load_tokenizer

TEMPLATE = load_default_chat_template()

# ---------------------------------------------------------------------------------------------------------
# The tokenizer: tests/tiny_tokenizer.py, trained on this file's corpus.

CORPUS = [
    "You are a helpful assistant. What is the weather in Moscow today? Let me think step by step.",
    "Ты полезный ассистент. Какая погода в Москве сегодня? Давай подумаем шаг за шагом.",
    'function get_weather parameter city {"type": "string", "description": "The city name"}',
    "The answer is 42. Ответ: сорок два. Tools, functions, parameters, required, properties.",
]


def _build_tokenizer_dir(directory: Path) -> Path:
    """Train a Qwen-like byte-level BPE (vocab 450) and save tokenizer.json + tokenizer_config.json."""
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    return tiny_tokenizer.build_tokenizer_dir(directory, CORPUS, 450, config)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return _build_tokenizer_dir(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def ours(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        chat_template=TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


# ---------------------------------------------------------------------------------------------------------
# Conversations.

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Погода в городе <city> & its "forecast" (°C)',
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Москва"},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
SYSTEM = {"role": "system", "content": "You are a helpful assistant.\n"}
USER_RU = {"role": "user", "content": "Какая погода в Москве?"}

CONVERSATIONS: dict[str, dict] = {
    "system_single_user": dict(messages=[SYSTEM, {"role": "user", "content": "Hello!"}]),
    "single_user_no_system": dict(messages=[{"role": "user", "content": "  What is 2+2?  \n"}]),
    "russian": dict(
        messages=[
            {"role": "system", "content": "Ты — полезный ассистент. Отвечай по-русски."},
            {"role": "user", "content": "Привет! Сколько будет «два плюс два»?"},
            {"role": "assistant", "content": "Четыре — это ответ."},
            {"role": "user", "content": "А ёжик? Ёлка, щука, эхо."},
        ]
    ),
    "multi_turn": dict(
        messages=[
            SYSTEM,
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross the road?"},
            {"role": "user", "content": "Why?"},
        ]
    ),
    "multi_turn_no_generation_prompt": dict(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye!"},
        ],
        add_generation_prompt=False,
    ),
    "reasoning_content": dict(
        messages=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "\nAdd two and two.\n"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "Три плюс три."},
        ],
        add_generation_prompt=False,
    ),
    "reasoning_content_then_prompt": dict(
        messages=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
            {"role": "user", "content": "3+3?"},
        ]
    ),
    "reasoning_aliases_thinking_and_reasoning": dict(
        messages=[
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "thinking": "thought one"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning": "thought two"},
        ],
        add_generation_prompt=False,
    ),
    "inline_think_in_content": dict(
        messages=[
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nold answer"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "<think>\n\nnew reasoning\n\n</think>\n\nnew answer"},
        ],
        add_generation_prompt=False,
    ),
    "inline_think_preserve_thinking": dict(
        messages=[
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nold answer"},
            {"role": "user", "content": "q2"},
        ],
        preserve_thinking=True,
    ),
    "preserve_thinking": dict(
        messages=[
            SYSTEM,
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
        ],
        preserve_thinking=True,
    ),
    "preserve_thinking_false": dict(
        messages=[
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"},
        ],
        preserve_thinking=False,
    ),
    "enable_thinking_false": dict(messages=[SYSTEM, USER_RU], enable_thinking=False),
    "enable_thinking_true": dict(messages=[SYSTEM, USER_RU], enable_thinking=True),
    "enable_thinking_false_no_generation_prompt": dict(
        messages=[USER_RU], enable_thinking=False, add_generation_prompt=False
    ),
    "tools_with_system": dict(messages=[SYSTEM, USER_RU], tools=[WEATHER_TOOL, SEARCH_TOOL]),
    "tools_without_system": dict(messages=[USER_RU], tools=[WEATHER_TOOL]),
    "tools_with_blank_system": dict(
        messages=[{"role": "system", "content": "   "}, USER_RU], tools=[WEATHER_TOOL], enable_thinking=False
    ),
    "empty_tools_list": dict(messages=[SYSTEM, USER_RU], tools=[]),
    "tool_call_round_trip": dict(
        messages=[
            SYSTEM,
            USER_RU,
            {
                "role": "assistant",
                "content": "Let me check the weather.",
                "reasoning_content": "The user wants the weather in Moscow.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "Москва", "days": 3, "unit": "celsius"},
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -5, "sky": "снег"}'},
            {"role": "assistant", "content": "В Москве −5 °C и снег.", "reasoning_content": "Summarize."},
        ],
        tools=[WEATHER_TOOL],
        add_generation_prompt=False,
    ),
    "tool_calls_multiple_no_content_consecutive_responses": dict(
        messages=[
            {"role": "user", "content": "Weather in Moscow and London, and search news."},
            {
                "role": "assistant",
                "content": None,  # dropped by transformers' normalization
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Moscow"}},
                    },
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "London"}},
                    },
                    # A flat tool call (no "function" wrapper) with non-string arguments.
                    {
                        "name": "search",
                        "arguments": {
                            "query": "news",
                            "filters": {"lang": ["ru", "en"], "fresh": True, "score": 0.5, "none": None},
                        },
                    },
                ],
            },
            {"role": "tool", "content": "Moscow: -5"},
            {"role": "tool", "content": "London: 8"},
            {"role": "tool", "content": "  news: nothing  "},
        ],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
    ),
    "multi_step_tool_user_tool_response": dict(
        messages=[
            {"role": "user", "content": "First question"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "need a tool",
                "tool_calls": [{"function": {"name": "search", "arguments": {"query": "x"}}}],
            },
            # A user message that only carries a tool response does not count as the last query.
            {"role": "user", "content": "<tool_response>\nresult x\n</tool_response>"},
            {"role": "assistant", "content": "Done.", "reasoning_content": "got it"},
        ],
        tools=[SEARCH_TOOL],
        add_generation_prompt=False,
    ),
    "content_parts": dict(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "System part one. "}, {"text": "Two."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Привет, "}, {"type": "text", "text": "мир"}],
            },
        ]
    ),
    "extra_kwargs_and_special_tokens": dict(
        messages=[{"role": "user", "content": "hi"}],
        enable_thinking=True,
        preserve_thinking=True,
        custom_flag="ignored by the template",
    ),
}


def _hf_render(hf, case: dict, **extra) -> str:
    case = copy.deepcopy(case)
    messages = case.pop("messages")
    case.setdefault("add_generation_prompt", True)
    return hf.apply_chat_template(messages, tokenize=False, **case, **extra)


def _our_render(case: dict, **extra) -> str:
    case = copy.deepcopy(case)
    messages = case.pop("messages")
    return apply_chat_template(TEMPLATE, messages, **case, **extra)


def test_enough_conversations():
    assert len(CONVERSATIONS) >= 12


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_transformers(hf, ours, name):
    case = CONVERSATIONS[name]
    expected = _hf_render(hf, case)
    # transformers passes the tokenizer's named special tokens; pass the same ones.
    got = _our_render(case, **ours.special_tokens_map)
    assert got == expected
    # The template does not read the special tokens, so leaving them out changes nothing.
    assert _our_render(case) == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_token_ids_match_transformers(hf, ours, name):
    case = copy.deepcopy(CONVERSATIONS[name])
    messages = case.pop("messages")
    case.setdefault("add_generation_prompt", True)
    hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **case)
    rendered = _our_render(CONVERSATIONS[name])
    ids = ours.encode(rendered)
    assert ids == list(hf_ids)
    assert ids == hf(rendered, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == rendered
    for token in ("<|im_start|>", "<|im_end|>"):
        assert ids.count(ours.token_to_id(token)) == rendered.count(token)


def test_inputs_are_not_modified():
    case = copy.deepcopy(CONVERSATIONS["tool_call_round_trip"])
    before = copy.deepcopy(case)
    apply_chat_template(TEMPLATE, case["messages"], tools=case["tools"])
    assert case == before


def test_default_add_generation_prompt_is_true():
    messages = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(TEMPLATE, messages).endswith("<|im_start|>assistant\n<think>\n")
    assert apply_chat_template(TEMPLATE, messages, add_generation_prompt=False).endswith("hi<|im_end|>\n")


def test_hand_written_expectations():
    # Independent of transformers: the exact prompts of the Qwen3.6 template.
    messages = [SYSTEM, {"role": "user", "content": "Привет"}]
    assert apply_chat_template(TEMPLATE, messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nПривет<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert apply_chat_template(TEMPLATE, messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    turn = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "r",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": "Ё", "b": [1, "x"]}}}],
        },
        {"role": "tool", "content": "ok"},
    ]
    assert apply_chat_template(TEMPLATE, turn, add_generation_prompt=False) == (
        "<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr\n</think>\n\n"
        "<tool_call>\n<function=f>\n<parameter=a>\nЁ\n</parameter>\n"
        '<parameter=b>\n[1, "x"]\n</parameter>\n</function>\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
    )
    tools_prompt = apply_chat_template(TEMPLATE, [{"role": "user", "content": "q"}], tools=[WEATHER_TOOL])
    # tojson: ensure_ascii=False and no HTML escaping, default separators.
    assert '"description": "Погода в городе <city> & its \\"forecast\\" (°C)"' in tools_prompt
    assert tools_prompt.startswith(
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:"
    )


def test_string_tool_arguments_fail_like_transformers(hf):
    # This template iterates `arguments|items`, so OpenAI-style JSON-string arguments are not supported:
    # both implementations fail with jinja2's own TypeError.
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
    ]
    with pytest.raises(TypeError) as hf_err:
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(TypeError) as our_err:
        apply_chat_template(TEMPLATE, messages)
    assert str(our_err.value) == str(hf_err.value) == "Can only get item pairs from a mapping."


# ---------------------------------------------------------------------------------------------------------
# Malformed conversations: the template's own messages, identical to transformers'.

MALFORMED = {
    "system_not_first": (
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "late system"}],
        "System message must be at the beginning.",
    ),
    "unknown_role": (
        [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"}],
        "Unexpected message role.",
    ),
    "no_user_query": ([{"role": "system", "content": "only system"}], "No user query found in messages."),
    "only_tool_responses": (
        [{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}],
        "No user query found in messages.",
    ),
    "image_in_system": (
        [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "hi"}],
        "System message cannot contain images.",
    ),
    "video_in_system": (
        [
            {"role": "system", "content": [{"type": "video", "video": "v.mp4"}]},
            {"role": "user", "content": "hi"},
        ],
        "System message cannot contain videos.",
    ),
    "bad_content_type": ([{"role": "user", "content": 42}], "Unexpected content type."),
    "bad_content_item": (
        [{"role": "user", "content": [{"type": "audio"}]}],
        "Unexpected item type in content.",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_conversations_raise_template_message(hf, name):
    jinja2 = pytest.importorskip("jinja2")
    messages, message = MALFORMED[name]
    with pytest.raises(jinja2.exceptions.TemplateError) as hf_err:
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as our_err:
        apply_chat_template(TEMPLATE, messages)
    assert str(hf_err.value) == message
    assert str(our_err.value) == message
    assert our_err.value.message == message
    assert isinstance(our_err.value, ValueError)


def test_empty_conversation(hf):
    with pytest.raises(ValueError) as hf_err:
        hf.apply_chat_template([], tokenize=False)
    with pytest.raises(ChatTemplateError) as our_err:
        apply_chat_template(TEMPLATE, [])
    assert str(our_err.value) == str(hf_err.value)


def test_non_dict_message_and_tool():
    with pytest.raises(TypeError, match="Chat messages should be dicts"):
        apply_chat_template(TEMPLATE, ["hello"])
    with pytest.raises(TypeError, match="JSON-schema dicts"):
        apply_chat_template(TEMPLATE, [{"role": "user", "content": "q"}], tools=[len])


# ---------------------------------------------------------------------------------------------------------
# The Jinja environment on other templates: options, filters and globals as in transformers.

GENERIC_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message.role == 'stop' %}{% break %}{% endif %}
    {%- if message.role == 'skip' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {% generation %}[{{ ns.n }}] {{ message.role }}: {{ message.content }}{% endgeneration %}
{{ message | tojson }}
{{ message | tojson(indent=2, sort_keys=true) }}
{{ dict(a=1, b=message.role) | tojson(separators=(',', ':')) }}
{% endfor %}
    {% if tools %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token }}{{ extra if extra is defined else 'no-extra' }}|{{ documents is none }}"""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_generic_template_matches_transformers(tok_dir, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        chat_template=GENERIC_TEMPLATE,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str | None

    messages = [
        {"role": "user", "content": "<b>&amp; «ёлка»</b>", "tool_calls": None},
        {"role": "skip", "content": "skipped"},
        Msg(role="assistant", content="reply"),
        {"role": "assistant", "content": "x", "reasoning": "aliased reasoning"},
        {"role": "stop", "content": "stops the loop"},
        {"role": "user", "content": "never rendered"},
    ]
    kwargs = dict(tools=[SEARCH_TOOL], add_generation_prompt=add_generation_prompt, extra=("t", 1))
    expected = hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    got = apply_chat_template(GENERIC_TEMPLATE, messages, **hf_tok.special_tokens_map, **kwargs)
    assert got == expected
    assert "tool_calls" not in got  # None-valued keys are dropped
    assert '"thinking": "aliased reasoning"' in got


def test_strftime_now():
    template = "{{ strftime_now('%Y') }}"
    assert apply_chat_template(template, [{"role": "user", "content": "x"}]) == str(datetime.now().year)


def test_raise_exception_in_any_template():
    template = (
        "{% if messages | length > 1 %}"
        "{{ raise_exception('Only one message, got ' ~ messages | length) }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"^Only one message, got 2$"):
        apply_chat_template(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_sandbox_is_immutable_and_namespace_checked():
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.SecurityError):
        apply_chat_template("{% set _ = messages.append(1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        apply_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])


def test_load_default_chat_template_is_the_data_file():
    path = Path(__file__).resolve().parents[1] / "qwen_jax" / "data" / "chat_template.jinja"
    assert load_default_chat_template() == path.read_text(encoding="utf-8")
    assert "enable_thinking" in TEMPLATE and "preserve_thinking" in TEMPLATE


def test_modules_do_not_import_transformers_or_torch():
    code = (
        "import sys, qwen_jax.chat, qwen_jax.tokenizer, qwen_jax.replies\n"
        "bad = sorted(m for m in ('transformers', 'torch') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
