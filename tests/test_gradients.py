"""Gradient parity with torch autograd: fp32 gradients of the mean token cross-entropy with respect to every
parameter, JAX (default backends) against transformers' Qwen3_5MoeForCausalLM (eager attention and experts, as the
parity tests run it), on a left-padded batch, on one device and under an ``ep`` mesh of 4 fake CPU devices.
Criterion per leaf: max |JAX - HF| <= 1e-5 x max(1, max |HF grad|) (tests/gradient_parity.py). Default run: the two
4-layer configs; the 8-layer top-4 config is slow-marked (each config costs one compilation of the backward pass).

HF's gradients are saved as an HF checkpoint and read with ``qwen_jax.load_hf``, so the one table in
``qwen_jax/hf_layout.py`` maps them onto the JAX leaves (side-by-side ``in_proj``/``qkv_proj``/``shared_gate_up``,
fused experts in [E, in, out]) with its strict bookkeeping: every leaf set exactly once, every tensor consumed.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from gradient_parity import batch, check_gradients, loss_weights

from qwen_jax.model import default_positions

hf_reference = pytest.importorskip("hf_reference")
torch = pytest.importorskip("torch")
from test_sharding import run_on_8_devices  # noqa: E402

CONFIGS = ("hv2hk_top2of8", "dk_ne_dv")  # 4 layers each; the 8-layer top-4 config runs in the slow set
SLOW_CONFIGS = ("hveqhk_top4of16",)

EXPERT_PARALLEL = r"""
import sys
import jax
jax.config.update("jax_cpu_enable_async_dispatch", False)
sys.path.insert(0, sys.argv[1])  # tests/
from gradient_parity import check_gradients
from qwen_jax.sharding import make_mesh

mesh = make_mesh(4, devices=jax.devices()[:4])
for checkpoint, gradients, loss in zip(*[iter(sys.argv[2:])] * 3):
    print(checkpoint, "ep=4:", check_gradients(checkpoint, gradients, float(loss), mesh), flush=True)
"""


def hf_loss_and_gradients(hf, ids, mask) -> tuple[float, dict[str, np.ndarray]]:
    """The same loss through the HF model (positions as qwen_jax builds them for left padding), and torch
    autograd's gradient of every parameter, by HF name."""
    hf.zero_grad()
    logits = hf(
        torch.as_tensor(ids),
        attention_mask=torch.as_tensor(mask),
        position_ids=torch.as_tensor(np.array(default_positions(mask))),
        use_cache=False,
    ).logits[:, :-1]
    token_logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.as_tensor(ids[:, 1:, None]))[..., 0]
    weights = torch.as_tensor(loss_weights(mask))
    loss = -(token_logp * weights).sum() / weights.sum()
    loss.backward()
    return loss.item(), {name: p.grad.numpy().copy() for name, p in hf.named_parameters()}


def save_as_checkpoint(grads: dict[str, np.ndarray], checkpoint: Path, out: Path) -> Path:
    """HF gradients written as an HF checkpoint (same names, the model's config.json), for ``load_hf``."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    shutil.copy(checkpoint / "config.json", out / "config.json")
    save_file(grads, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def hf_gradients(tiny_checkpoints, tmp_path_factory):
    """{config name: (checkpoint dir, dir of HF's gradients as a checkpoint, HF loss)}, computed once."""
    root = tmp_path_factory.mktemp("hf_gradients")

    @functools.cache
    def compute(name: str):
        checkpoint = tiny_checkpoints(name)
        loss, grads = hf_loss_and_gradients(hf_reference.load_hf_reference(checkpoint), *batch())
        return checkpoint, save_as_checkpoint(grads, checkpoint, root / name), loss

    return compute


@pytest.mark.parametrize(
    "name", [*CONFIGS, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_CONFIGS)]
)
def test_gradients_match_torch_autograd(name, hf_gradients):
    print(name, check_gradients(*hf_gradients(name)))


@pytest.mark.parametrize("names", [CONFIGS, pytest.param(SLOW_CONFIGS, marks=pytest.mark.slow)])
def test_expert_parallel_gradients_match_torch_autograd(names, hf_gradients):
    """The experts split over ep=4 (shard_map + psum), in one subprocess: the same gradients as torch."""
    args = [str(x) for name in names for x in hf_gradients(name)]
    result = run_on_8_devices(EXPERT_PARALLEL, Path(__file__).parent, 900, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ep=4: ") == len(names), result.stdout
    print(result.stdout)
