"""The tests' HF reference: :mod:`audit.hf_models` (tiny seeded checkpoints), skipped when torch is missing."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from audit.hf_models import (  # noqa: F401
    TINY_CONFIGS,
    build_hf_model,
    hf_config,
    hf_forward,
    load_hf_reference,
    save_checkpoint,
)
