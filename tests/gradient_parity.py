"""The JAX side of the gradient-parity test (tests/test_gradients.py), free of torch so that its multi-device
subprocess starts quickly: the batch, the loss, and the per-leaf comparison against HF's gradients.

HF's gradients arrive as an HF checkpoint (same tensor names, the model's ``config.json``) and are read with
``qwen_jax.load_hf``, so the one table in ``qwen_jax/hf_layout.py`` maps them onto the JAX leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import qwen_jax
from qwen_jax.sharding import param_spec, shard_model

RELATIVE = 1e-5  # per leaf: max abs diff <= RELATIVE * max(1, max |HF grad|)
LENGTH, PADDING = 70, (0, 23)  # two delta-rule chunks; row 1 is left-padded with 23 tokens


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Two rows of LENGTH tokens, the second left-padded (padding id 0, mask 0)."""
    ids = np.random.RandomState(16).randint(0, 256, (len(PADDING), LENGTH))
    mask = np.ones_like(ids)
    for row, pad in enumerate(PADDING):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def loss_weights(mask: np.ndarray) -> np.ndarray:
    """[B, L-1]: position t predicts token t+1 when both are real tokens (padding is out of the loss)."""
    return (mask[:, :-1] * mask[:, 1:]).astype(np.float32)


def jax_loss(model, ids, mask):
    """Mean cross-entropy of the next real token, in fp32."""
    logits = qwen_jax.forward(model, ids, mask).astype(jnp.float32)[:, :-1]
    token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
    weights = loss_weights(mask)
    return -(token_logp * weights).sum() / weights.sum()


def flat_values(state) -> dict[tuple, np.ndarray]:
    """{leaf path: numpy array} of an ``nnx.State`` (a model's parameters or their gradients)."""
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def mismatches(ours: dict, reference: dict) -> tuple[list[str], float, str]:
    """Leaves whose gradients differ by more than RELATIVE x max(1, max |reference|), the worst ratio of the
    difference to that bound over all leaves, and that leaf."""
    assert ours.keys() == reference.keys(), set(ours) ^ set(reference)
    bad, worst, worst_leaf = [], 0.0, ""
    for path, ref in reference.items():
        bound = RELATIVE * max(1.0, float(np.abs(ref).max()))
        diff = float(np.abs(ours[path] - ref).max())
        name = ".".join(map(str, path))
        if diff / bound > worst:
            worst, worst_leaf = diff / bound, name
        if not diff <= bound:
            bad.append(f"{name}: max diff {diff:.3g} > {bound:.3g}")
    return bad, worst, worst_leaf


def check_gradients(checkpoint, hf_gradients_dir, hf_loss: float, mesh=None) -> str:
    """JAX's loss and gradients on :func:`batch` against HF's, on one device or with the model sharded on
    ``mesh`` and run under it; raises AssertionError naming the leaves that miss; returns a summary line."""
    model = qwen_jax.load_hf(checkpoint, "float32")
    if mesh is None:
        loss, grads = nnx.value_and_grad(jax_loss)(model, *batch())
    else:
        with jax.set_mesh(mesh):
            loss, grads = nnx.value_and_grad(jax_loss)(shard_model(model, mesh), *batch())
        for path, leaf in nnx.to_flat_state(
            grads
        ):  # each gradient is laid out as its parameter (experts split)
            value = leaf.get_value()
            assert value.sharding.is_equivalent_to(NamedSharding(mesh, param_spec(path)), value.ndim), path
    assert abs(float(loss) - hf_loss) <= RELATIVE * max(1.0, abs(hf_loss)), (float(loss), hf_loss)
    reference = flat_values(nnx.state(qwen_jax.load_hf(hf_gradients_dir, "float32"), nnx.Param))
    bad, worst, leaf = mismatches(flat_values(grads), reference)
    assert not bad, "\n".join(bad)
    return f"{len(reference)} leaves, worst diff/bound {worst:.3f} ({leaf})"
