"""``python -m qwen_jax generate`` on a tiny checkpoint with a tokenizer built in the test."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tiny_tokenizer

from qwen_jax.generate import generate
from qwen_jax.loading import load_hf
from qwen_jax.tokenizer import load_tokenizer

CORPUS = ["Hello world, this is a tiny tokenizer for a tiny model.", "Привет, мир! Маленькая модель."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with a 512-row vocabulary and a tokenizer whose ids fit in it."""
    hf_reference = pytest.importorskip("hf_reference")
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    hf_reference.save_checkpoint(hf_reference.build_hf_model("hv2hk_top2of8", vocab_size=512), path)
    tiny_tokenizer.build_tokenizer_dir(path, CORPUS, 300, {"eos_token": "<|im_end|>"})
    assert load_tokenizer(path).vocab_size <= 512
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_jax", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_generate_streams_the_greedy_continuation(checkpoint):
    result = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "Hello world",
                     "--max-new-tokens", "12", "--dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(checkpoint)
    out = generate(load_hf(checkpoint, "float32"), [tokenizer.encode("Hello world")], max_new_tokens=12)
    expected = tokenizer.decode(list(out.tokens[0, : out.lengths[0]]))
    assert result.stdout == expected + "\n"


def test_chat_prompt_runs(checkpoint):
    result = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "Привет", "--chat",
                     "--max-new-tokens", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope" in result.stderr
