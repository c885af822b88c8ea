"""A compare report of hand-made reference and JAX runs (float32, four layers of the real 3:1 pattern), for tests
that check the verdict and the report without running either model."""

from __future__ import annotations

LAYER_TYPES = ("linear_attention", "linear_attention", "linear_attention", "full_attention")


def synthetic_report(reference, jax_run, **settings) -> dict:
    """``audit.compare.build_report`` of ``reference`` and ``jax_run`` with float32 settings (``settings``
    overrides them)."""
    from audit.compare import build_report

    defaults = {
        "dtype": "float32",
        "seed": 0,
        "max_new_tokens": 2,
        "checkpoint": "c",
        "jax_checkpoint": None,
        "prompts_source": "test",
        "reference_source": "live",
        "reasoning_split": None,
    }
    return build_report(
        reference=reference,
        jax_run=jax_run,
        settings=defaults | settings,
        jax_manifest={"dtype": "float32"},
        layer_types=list(LAYER_TYPES),
        decode=lambda ids: " ".join(map(str, ids)),
        tool_version="test",
    )
