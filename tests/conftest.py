"""Shared fixtures: tiny seeded HF checkpoints, built once per session, and their HF and JAX models."""

from __future__ import annotations

import functools

import jax
import pytest

# XLA:CPU's asynchronous dispatch occasionally never wakes a thread waiting for a result when torch's OpenMP pool
# runs in the same process (seen here as a hang with every thread idle; jax-ml/jax#25861). Dispatch synchronously.
jax.config.update("jax_cpu_enable_async_dispatch", False)

PARITY_LENGTHS = (1, 63, 64, 65, 150, 520)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{config name: checkpoint dir}, built lazily with transformers."""
    hf_reference = pytest.importorskip("hf_reference")
    root = tmp_path_factory.mktemp("tiny_checkpoints")

    @functools.cache
    def build(name: str):
        return hf_reference.save_checkpoint(hf_reference.build_hf_model(name), root / name)

    return build
