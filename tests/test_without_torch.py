"""The JAX side imports and runs with torch and transformers unavailable."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None          # any import of torch or transformers now fails
sys.modules["transformers"] = None
import numpy as np
import qwen_jax
model = qwen_jax.load_hf(sys.argv[1], "float32")
logits = qwen_jax.forward(model, np.arange(10)[None])
out = qwen_jax.generate(model, [[1, 2, 3]], max_new_tokens=4, stop_token_ids=())
assert logits.shape == (1, 10, model.cfg.vocab_size) and out.tokens.shape == (1, 4)
print("ran without torch")
"""


def test_load_forward_generate_without_torch(tiny_checkpoints):
    path = tiny_checkpoints("hv2hk_top2of8")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "ran without torch" in result.stdout
