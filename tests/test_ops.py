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


def test_permute_rows_is_the_scatter_in_value_and_gradient():
    """bf16 rows moved as bits: the same values as ``into.at[index].set(rows)``, and the same gradient."""
    import jax

    from qwen_jax.ops import permute_rows

    rows = jax.random.normal(jax.random.key(0), (7, 5), jnp.bfloat16)
    index = jnp.array([3, 0, 6, 1, 5, 2, 4])
    into = jnp.zeros_like(rows)
    expected = into.at[index].set(rows)
    ours = jax.jit(permute_rows)(rows, index, into)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(expected, np.float32))
    weights = jnp.arange(35.0, dtype=jnp.bfloat16).reshape(7, 5)
    grad = jax.grad(lambda r: jnp.sum(permute_rows(r, index, into).astype(jnp.float32) * weights))(rows)
    plain = jax.grad(
        lambda r: jnp.sum(into.at[index].set(r, unique_indices=True).astype(jnp.float32) * weights)
    )(rows)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(plain, np.float32))
