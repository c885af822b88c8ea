"""qwen_jax: a JAX/Flax (NNX) reimplementation of the Qwen3.5/3.6 MoE text decoder (Qwen3.6-35B-A3B).

Importing it asks XLA to round every bf16 intermediate as written (``--xla_allow_excess_precision=false``), so that a
jitted bf16 forward rounds where PyTorch rounds; without it XLA fuses elementwise ops and keeps fp32 in between.
Set ``QWEN_JAX_ALLOW_EXCESS_PRECISION=1`` to leave XLA's default, or import qwen_jax before JAX initialises a backend.
"""

import os as _os

if _os.environ.get(
    "QWEN_JAX_ALLOW_EXCESS_PRECISION"
) != "1" and "xla_allow_excess_precision" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (
        _os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false"
    ).strip()

from qwen_jax.checkpoint import load
from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.generate import Generation, generate, stream_generate
from qwen_jax.loading import CheckpointError, load_hf
from qwen_jax.model import ForwardOutput, Qwen35MoeForCausalLM, forward

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ForwardOutput",
    "Generation",
    "ModelConfig",
    "Qwen35MoeForCausalLM",
    "forward",
    "generate",
    "load",
    "load_hf",
    "stream_generate",
]
