"""Intermediates on request (``forward(..., capture=...)``): each matches transformers' own value at fp32 where
transformers exposes it, capturing leaves the logits bit for bit, and without names the program is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import qwen_jax
from qwen_jax.loading import load_hf
from qwen_jax.model import CAPTURABLE, _forward_jit, default_positions

hf_reference = pytest.importorskip("hf_reference")
torch = pytest.importorskip("torch")

FP32_ATOL = (
    1e-4  # as tests/test_model_parity.py: hidden states, router logits, expert outputs, DeltaNet states
)
PROBS_ATOL = 1e-5  # attention probabilities lie in [0, 1]
LENGTH, PADS = 70, (0, 23)  # past one delta-rule chunk (64); the second row left-padded


def padded_batch(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(seed).randint(0, 256, (len(PADS), LENGTH))
    mask = np.ones_like(ids)
    for row, pad in enumerate(PADS):
        mask[row, :pad], ids[row, :pad] = 0, 0
    return ids, mask


def hf_intermediates(hf, ids: np.ndarray, mask: np.ndarray):
    """HF's fp32 forward with everything it exposes: hidden states, router logits, eager attention weights, the
    DeltaNet states its cache keeps, and each layer's MoE input (the experts module's input, by a forward hook)."""
    expert_inputs = {}
    hooks = [
        layer.mlp.experts.register_forward_hook(
            lambda module, args, out, index=index: expert_inputs.__setitem__(index, args[0])
        )
        for index, layer in enumerate(hf.model.layers)
    ]
    as_torch = lambda a: torch.as_tensor(np.array(a), dtype=torch.long)  # noqa: E731
    try:
        with torch.no_grad():
            out = hf(
                as_torch(ids),
                attention_mask=as_torch(mask),
                position_ids=as_torch(default_positions(mask)),
                output_hidden_states=True,
                output_attentions=True,
                output_router_logits=True,
                use_cache=True,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return out, expert_inputs


def expected_slot_outputs(experts, x: torch.Tensor, expert_ids: np.ndarray) -> np.ndarray:
    """HF's expert weights applied to HF's MoE input for the given (token, slot) experts, unweighted: [N, k, H]."""
    ids = torch.as_tensor(np.array(expert_ids), dtype=torch.long)
    with torch.no_grad():
        gate, up = torch.einsum("nkfh,nh->nkf", experts.gate_up_proj[ids], x).chunk(2, dim=-1)
        return torch.einsum("nkhf,nkf->nkh", experts.down_proj[ids], experts.act_fn(gate) * up).numpy()


#: One config in the default run (Hkv = 1 under 8 query heads, dk != dv); the others are slow-marked.
CONFIGS = [
    name if name == "dk_ne_dv" else pytest.param(name, marks=pytest.mark.slow)
    for name in hf_reference.TINY_CONFIGS
]


@pytest.mark.parametrize("name", CONFIGS)
def test_captures_match_hf_fp32(name, tiny_checkpoints):
    """Every capturable intermediate on a left-padded batch, against HF (real tokens / real query rows only); the
    logits are those of the forward without capture, bit for bit."""
    path = tiny_checkpoints(name)
    hf, model = hf_reference.load_hf_reference(path, "float32"), load_hf(path, "float32")
    ids, mask = padded_batch()
    out = qwen_jax.forward(model, ids, mask, return_hidden_states=True, capture=CAPTURABLE)
    assert np.array_equal(np.asarray(out.logits), np.asarray(qwen_jax.forward(model, ids, mask)))
    assert set(out.captured) == set(CAPTURABLE)
    assert all(len(values) == len(model.layers) for values in out.captured.values())
    ref, ref_expert_inputs = hf_intermediates(hf, ids, mask)
    real = mask.reshape(-1) > 0
    full_attention = iter(ref.attentions)  # HF records attention weights of the full-attention layers only
    captured = out.captured
    for index, layer_type in enumerate(model.cfg.layer_types):
        where = f"{name} layer {index}"
        if index < len(model.layers) - 1:  # HF's last hidden state is the final norm's output
            ours = np.asarray(captured["hidden_states"][index])
            assert np.array_equal(ours, np.asarray(out.hidden_states[index + 1]))
            np.testing.assert_allclose(
                ours[mask > 0], ref.hidden_states[index + 1].numpy()[mask > 0], atol=FP32_ATOL, err_msg=where
            )
        np.testing.assert_allclose(
            np.asarray(captured["router_logits"][index])[real],
            ref.router_logits[index].numpy()[real],
            atol=FP32_ATOL,
            err_msg=where,
        )
        routing = captured["routing"][index]
        assert np.array_equal(np.asarray(routing.experts), np.asarray(out.routing[index].experts))
        np.testing.assert_allclose(
            np.asarray(captured["expert_outputs"][index])[real],
            expected_slot_outputs(
                hf.model.layers[index].mlp.experts, ref_expert_inputs[index], routing.experts
            )[real],
            atol=FP32_ATOL,
            err_msg=where,
        )
        probs, state = captured["attention_probs"][index], captured["deltanet_state"][index]
        if layer_type == "full_attention":
            assert state is None
            ours, theirs = np.asarray(probs), next(full_attention).numpy()
            assert ours.shape == (len(PADS), model.cfg.num_attention_heads, LENGTH, LENGTH)
            for row, pad in enumerate(PADS):  # real query rows only (HF's padded rows are uniform, ours zero)
                np.testing.assert_allclose(
                    ours[row, :, pad:], theirs[row, :, pad:], atol=PROBS_ATOL, err_msg=where
                )
        else:
            assert probs is None
            np.testing.assert_allclose(
                np.asarray(state),
                ref.past_key_values.get_recurrent_state(index).numpy(),
                atol=FP32_ATOL,
                err_msg=where,
            )
    assert next(full_attention, None) is None


def test_without_names_the_program_is_the_default_one(tiny_checkpoints):
    """The forward lowered with ``capture=()`` is the text of the one lowered without the argument."""
    model = load_hf(tiny_checkpoints("dk_ne_dv"), "float32")
    ids = np.zeros((1, 8), np.int32)
    mask = np.ones_like(ids)
    graphdef, state = nnx.split(model)
    args = (graphdef, state, ids, mask, default_positions(mask), "auto", False)
    default = _forward_jit.lower(*args).as_text()
    assert _forward_jit.lower(*args, ()).as_text() == default
    assert (
        _forward_jit.lower(*args, ("router_logits",)).as_text() != default
    )  # capturing does reach the program


def test_unknown_capture_name_is_a_clear_error(tiny_checkpoints):
    model = load_hf(tiny_checkpoints("hv2hk_top2of8"), "float32")
    with pytest.raises(ValueError, match=r"cannot capture \['attention_weights'\]"):
        qwen_jax.forward(model, np.zeros((1, 4), np.int32), capture=("routing", "attention_weights"))
