"""Greedy generation with the decode state: token-identical to HF generate, decode == forward, one compilation."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import qwen_jax
from qwen_jax.generate import _decode_loop, generate, left_pad
from qwen_jax.loading import load_hf

hf_reference = pytest.importorskip("hf_reference")
torch = pytest.importorskip("torch")

NAME = "hv2hk_top2of8"
PROMPT_LENGTHS = (5, 40, 70, 130)  # some longer than one 64-token chunk
NEW_TOKENS = 64


def prompts(seed: int = 0) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [[int(t) for t in rs.randint(0, 256, n)] for n in PROMPT_LENGTHS]


@functools.cache
def models(path: str, dtype: str):
    return hf_reference.load_hf_reference(path, dtype), load_hf(path, dtype)


def hf_greedy(
    hf, ids: np.ndarray, mask: np.ndarray, new_tokens: int = NEW_TOKENS, first_logits: bool = False
):
    """HF's greedy tokens [B, new_tokens] after the left-padded prompts; with ``first_logits`` also the logits
    [B, vocab] the first token was chosen from."""
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    return (tokens, out.logits[0].numpy()) if first_logits else tokens


def first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if len(diff) else None


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints):
    return str(tiny_checkpoints(NAME))


def test_fp32_greedy_is_token_identical_to_hf_at_batch_1(ckpt):
    hf, model = models(ckpt, "float32")
    for prompt in prompts():
        ids, mask = left_pad([prompt])
        ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, stop_token_ids=(), pad_to_multiple=1)
        np.testing.assert_array_equal(
            ours.tokens[0], hf_greedy(hf, ids, mask)[0], err_msg=f"prompt {len(prompt)}"
        )


def test_fp32_greedy_is_token_identical_to_hf_batched_left_padded(ckpt):
    hf, model = models(ckpt, "float32")
    ids, mask = left_pad(prompts(seed=1))
    ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, stop_token_ids=(), pad_to_multiple=1)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, mask))


@pytest.mark.slow  # a report more than a check (test budget); fp32 greedy parity is in the default run
def test_bf16_greedy_reports_first_divergence(ckpt, capsys):
    hf, model = models(ckpt, "bfloat16")
    positions = []
    for prompt in prompts():
        ids, mask = left_pad([prompt])
        ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, stop_token_ids=(), pad_to_multiple=1)
        positions.append(first_divergence(ours.tokens[0], hf_greedy(hf, ids, mask)[0]))
    with capsys.disabled():
        print(f"\nbf16 greedy, first divergence from HF-bf16 per prompt {PROMPT_LENGTHS}: {positions}")
    assert positions[0] is None  # a 5-token prompt stays within one chunk: bitwise-identical decoding


def test_decode_logits_equal_full_forward(ckpt):
    _, model = models(ckpt, "float32")
    for prompt in prompts(seed=2):
        out = generate(model, [prompt], max_new_tokens=NEW_TOKENS, stop_token_ids=(), return_logits=True)
        full = np.asarray(qwen_jax.forward(model, np.array([prompt + list(out.tokens[0])])))
        np.testing.assert_allclose(out.logits[0], full[0, len(prompt) - 1 : -1], rtol=0, atol=1e-4)


def test_stops_at_stop_tokens_per_row(ckpt):
    _, model = models(ckpt, "float32")
    free = generate(model, prompts()[:2], max_new_tokens=20, stop_token_ids=())
    stop = int(free.tokens[0, 6])  # a token row 0 produces at step 6
    out = generate(model, prompts()[:2], max_new_tokens=20, stop_token_ids=(stop,), pad_token_id=-1)
    first = int(np.argmax(free.tokens[0] == stop))
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (out.tokens[0, first + 1 :] == -1).all()
    row1_stop = np.nonzero(free.tokens[1] == stop)[0]
    expected1 = int(row1_stop[0]) + 1 if len(row1_stop) else 20
    assert out.lengths[1] == expected1
    np.testing.assert_array_equal(out.tokens[1, :expected1], free.tokens[1, :expected1])


def test_decode_loop_compiles_once_per_batch_and_max_length(ckpt):
    _, model = models(ckpt, "float32")
    before = _decode_loop._cache_size()
    for seed, new_tokens in ((3, 7), (4, 33), (5, 64)):
        generate(model, prompts(seed)[:3], max_new_tokens=new_tokens, max_length=512, stop_token_ids=(1, 2))
    assert _decode_loop._cache_size() == before + 1


def test_default_stop_tokens_come_from_generation_config(ckpt):
    from qwen_jax.generate import DEFAULT_STOP_TOKEN_IDS, default_stop_token_ids

    _, model = models(ckpt, "float32")
    saved = model.cfg.generation_eos_token_ids  # what transformers wrote into generation_config.json
    assert default_stop_token_ids(model) == (saved or DEFAULT_STOP_TOKEN_IDS)
