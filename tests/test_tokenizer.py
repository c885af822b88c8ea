"""qwen_jax.tokenizer against transformers' PreTrainedTokenizerFast, on a tiny byte-level BPE built here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tiny_tokenizer

from qwen_jax.tokenizer import QwenTokenizer, TokenizerLoadError, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the weather in Moscow today?",
    "You are a helpful assistant. Answer briefly and think step by step before answering.",
    "Привет! Как дела? Сегодня в Москве солнечно, температура двадцать градусов.",
    "Ты полезный ассистент. Отвечай кратко и по делу, думай шаг за шагом.",
    'def get_weather(city: str) -> dict:\n    return {"city": city, "unit": "celsius"}\n',
    "function parameter value, the answer is 42; 2 + 2 = 4. Let me think about this carefully.",
    "Москва — столица России. London is the capital of the United Kingdom.",
]
CASES = [
    "",
    "Hello, world!",
    "Привет, мир! Как дела?",
    "<|im_start|>user\nПривет<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nМосква\n</parameter>\n</function>\n</tool_call>",
    "  leading spaces and trailing   \n\n\t tabs\r\n",
    "emoji 🙂 and accents café, naïve; CJK 漢字",
    "e\u0301 (decomposed é is NFC-normalized)",
    "<|im_end|><|im_end|>glued<think>tokens</think>",
    "12345 + 67890 = 80235",
]


def build_tokenizer_dir(directory: Path) -> Path:
    """Train a Qwen-like byte-level BPE (vocab 500) and save tokenizer.json + tokenizer_config.json."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": "{{ messages[0]['content'] }}",
    }
    return tiny_tokenizer.build_tokenizer_dir(directory, CORPUS, 500, config)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ours(tok_dir) -> QwenTokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def test_vocab_is_small_and_has_control_tokens(ours):
    assert 400 <= ours.vocab_size <= 520
    ids = [ours.token_to_id(t) for t in tiny_tokenizer.SPECIAL + tiny_tokenizer.CONTROL]
    assert None not in ids
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("text", CASES)
def test_encode_decode_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_no_special_tokens_added_and_control_tokens_are_single_ids(ours):
    assert ours.encode("") == []
    ids = ours.encode("<|im_start|>user\n")
    assert ids[0] == ours.token_to_id("<|im_start|>")
    assert ours.encode("<think>") == [ours.token_to_id("<think>")]
    assert ours.encode("</tool_call>") == [ours.token_to_id("</tool_call>")]


@pytest.mark.parametrize("text", [t for t in CASES if t != "e\u0301 (decomposed é is NFC-normalized)"])
def test_round_trip(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_nfc_normalization(ours):
    assert ours.decode(ours.encode("e\u0301")) == "\u00e9"


def test_skip_special_tokens_drops_only_special(ours):
    ids = ours.encode("<|im_start|>assistant\n<think>\nhi</think><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhi</think>"


def test_config_special_tokens(ours, tok_dir):
    assert ours.special_tokens_map == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert ours.eos_token == "<|im_end|>"
    assert ours.eos_token_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.chat_template == "{{ messages[0]['content'] }}"
    assert ours.path == tok_dir / "tokenizer.json"


def test_special_tokens_map_matches_transformers(ours, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf_from_dir = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert ours.special_tokens_map == hf_from_dir.special_tokens_map
    assert ours.eos_token_id == hf_from_dir.eos_token_id
    assert ours.pad_token_id == hf_from_dir.pad_token_id


def test_load_from_file_path_and_without_config(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.special_tokens_map == {}
    assert tok.chat_template is None
    assert tok.eos_token_id is None
    assert tok.encode("Привет") == load_tokenizer(tok_dir).encode("Привет")


def test_chat_template_jinja_file_takes_precedence(tok_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ 'from file' }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template == "{{ 'from file' }}"


def test_missing_tokenizer_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_corrupt_tokenizer_names_path(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_corrupt_config_names_path(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
