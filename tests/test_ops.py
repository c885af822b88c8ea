import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.ops import greedy_tokens


def _awkward_logits(dtype) -> np.ndarray:
    logits = np.random.RandomState(0).standard_normal((8, 1000)).astype(np.float32)
    logits[1, [5, 7]] = 99.0  # a tie: the first wins
    logits[2, 300] = np.nan  # a NaN wins, as in torch.argmax
    logits[3, [20, 10]] = np.nan  # the first NaN
    logits[4, :] = -np.inf  # all -inf: index 0
    logits[5, 9] = np.inf
    logits[6, -1] = 50.0  # the last index
    return np.asarray(jnp.asarray(logits, dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_tokens_is_argmax_with_ties_nan_and_inf(dtype):
    logits = jnp.asarray(_awkward_logits(dtype), dtype)
    ours = np.asarray(greedy_tokens(logits))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.asarray(jnp.argmax(logits, axis=-1)))
    np.testing.assert_array_equal(ours[1:7], [5, 300, 10, 0, 9, 999])
