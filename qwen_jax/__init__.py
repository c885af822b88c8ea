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

import importlib as _importlib
import sys as _sys
import types as _types

#: The public names and the module that defines each, imported on first use (PEP 562).
_EXPORTS = {
    "load": "qwen_jax.checkpoint",
    "ConfigError": "qwen_jax.config",
    "ModelConfig": "qwen_jax.config",
    "Generation": "qwen_jax.generate",
    "generate": "qwen_jax.generate",
    "stream_generate": "qwen_jax.generate",
    "CheckpointError": "qwen_jax.loading",
    "load_hf": "qwen_jax.loading",
    "ForwardOutput": "qwen_jax.model",
    "Qwen35MoeForCausalLM": "qwen_jax.model",
    "forward": "qwen_jax.model",
}


class _Package(_types.ModuleType):
    """The package resolves its exports lazily, so that a light submodule (``qwen_jax.cli_contract``, the CLIs'
    argument and error handling) is imported without JAX, and bad arguments are answered in a fraction of a
    second. Importing the submodule ``qwen_jax.generate`` never hides the function ``qwen_jax.generate``."""

    def __getattr__(self, name: str):
        if name in _EXPORTS:
            return getattr(_importlib.import_module(_EXPORTS[name]), name)
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):
            return  # the import system binding a submodule of the same name: the export wins
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_EXPORTS})


_sys.modules[__name__].__class__ = _Package

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
