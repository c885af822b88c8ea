"""Shared fixtures: tiny seeded HF checkpoints, built once per session, and their HF and JAX models."""

from __future__ import annotations

import functools
import os

# XLA:CPU has hung here with every thread idle (twice in test_expert_choice_matches_hf, once with async dispatch
# off): a wedged intra-op Eigen pool, as in jax-ml/jax#25861 and PyAutoLabs/PyAutoFit#1528, whose fix was
# single-threaded Eigen. Set before JAX starts its backend; subprocess tests inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax
import pytest

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
