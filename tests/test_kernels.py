"""The native CPU grouped matmul (qwen_jax/kernels): numbers, batch invariance, where it is used, and its fallback."""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import kernels, moe
from qwen_jax.invariance import batch_invariant_mode, decode_step_mode

# N = 168 columns: whole 8-vector and 4-vector tiles, single vectors and single columns (AVX-512 and AVX2 alike);
# K = 136 features: whole blocks of input features (32 or 64) and a partial one.
E, K, N = 6, 136, 168
GROUPS = np.array([3, 0, 5, 1, 2, 0], np.int32)  # rows 0-10; 11 rows, with one more in no group


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    if not kernels.enabled():
        pytest.skip("the CPU kernel could not be built here (no compiler?)")


def operands(dtype, rows: int = int(GROUPS.sum()) + 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, K)), dtype)
    w = jnp.asarray(rng.normal(size=(E, K, N)), dtype)
    return x, w


def reference(x, groups, w) -> np.ndarray:
    """float64 numpy: each row times its expert's weights; rows past the groups give zeros."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    experts = np.repeat(np.arange(len(groups)), groups)
    out = np.zeros((x64.shape[0], w64.shape[2]))
    out[: len(experts)] = np.einsum("rk,rkn->rn", x64[: len(experts)], w64[experts])
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_equals_the_float64_reference_within_fp32_rounding(dtype):
    x, w = operands(dtype)
    out = np.asarray(kernels.grouped_matmul(x, jnp.asarray(GROUPS), w))
    ref = reference(x, GROUPS, w)
    assert out.dtype == np.float32
    # K fp32 roundings of partial sums bounded by sum |x_k w_k|: a generous 2 K eps of that bound.
    bound = 2 * K * np.finfo(np.float32).eps * reference(np.abs(np.asarray(x, np.float32)), GROUPS, np.abs(w))
    assert np.all(np.abs(out - ref) <= bound + 1e-30), np.abs(out - ref).max()
    assert not out[GROUPS.sum() :].any()  # the row in no group


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_rows_output_does_not_depend_on_the_other_rows(dtype):
    """Each row computed alone (a one-row group of its expert), or among other experts' rows, or at another place in
    its group's 4-row tile, gives the same bits as in the full batch."""
    x, w = operands(dtype)
    full = np.asarray(kernels.grouped_matmul(x, jnp.asarray(GROUPS), w))
    experts = np.repeat(np.arange(E), GROUPS)
    for row, expert in enumerate(experts):
        alone = np.zeros(E, np.int32)
        alone[expert] = 1
        out = kernels.grouped_matmul(x[row : row + 1], jnp.asarray(alone), w)
        assert np.array_equal(np.asarray(out)[0], full[row]), row
    # The first expert's 3 rows moved behind 4 other rows of its own: other tile positions, other tile sizes.
    moved = jnp.concatenate([x[3:7], x[:3]])
    out = np.asarray(kernels.grouped_matmul(moved, jnp.asarray([7, 0, 0, 0, 0, 0], jnp.int32), w))
    assert np.array_equal(out[4:], full[:3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_many_rows_over_many_items_give_each_rows_bits_alone(dtype):
    """A call cut into many items (experts with more rows than a tile, columns in several chunks), shared out among
    the calling thread and the pool's workers as each asks, gives every row the bits it has alone."""
    rng = np.random.default_rng(4)
    groups = np.array([9, 0, 14, 3], np.int32)
    x = jnp.asarray(rng.normal(size=(int(groups.sum()), 256)), dtype)
    w = jnp.asarray(rng.normal(size=(4, 256, 3000)), dtype)  # 256 x 3000 weights per expert: 3 column chunks
    full = np.asarray(kernels.grouped_matmul(x, jnp.asarray(groups), w))
    for row, expert in enumerate(np.repeat(np.arange(4), groups)):
        alone = np.asarray(
            kernels.grouped_matmul(x[row : row + 1], jnp.ones((1,), jnp.int32), w[expert : expert + 1])
        )
        assert np.array_equal(alone[0], full[row]), row


def test_concurrent_calls_give_the_bits_of_one_call():
    """Calls made at once from several threads (as XLA runs the devices of an ``ep`` mesh): one uses the pool, the
    others run on their own threads; each result is the same bits as the call alone."""
    import concurrent.futures

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(24, 256)), jnp.float32)
    groups = jnp.asarray([10, 6, 8], jnp.int32)
    weights = [jnp.asarray(rng.normal(size=(3, 256, 1500)), jnp.float32) for _ in range(4)]
    call = jax.jit(kernels.grouped_matmul)
    alone = [np.asarray(call(x, groups, w)) for w in weights]
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        for _ in range(5):
            at_once = list(threads.map(lambda w: np.asarray(call(x, groups, w)), weights))
            assert all(np.array_equal(a, b) for a, b in zip(alone, at_once, strict=True))


def test_an_invariant_decode_steps_dense_goes_through_the_kernel_at_any_row_count():
    """In the batch-invariant mode a decode step's ``ops.dense`` runs all rows through the kernel (no row tiles):
    each row gives the bits it has alone; a forward or prefill keeps the tiles (XLA's dot)."""
    from qwen_jax.ops import dense

    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(0, 0.1, (K, N)), jnp.float32)
    rows = jnp.asarray(rng.normal(size=(3, 7, K)), jnp.float32)
    assert "qwen_jax_grouped_matmul" in traced(dense, (rows, w), invariant=True)
    assert "qwen_jax_grouped_matmul" not in traced(dense, (rows, w), decoding=False, invariant=True)
    with decode_step_mode(True), batch_invariant_mode(True):
        ours = np.asarray(jax.jit(lambda r, w: dense(r, w))(rows, w))
        alone = np.asarray(jax.jit(lambda r, w: dense(r, w))(rows[1:2, 4:5], w))
    assert ours.shape == (3, 7, N)
    assert np.array_equal(alone[0, 0], ours[1, 4])
    np.testing.assert_allclose(
        ours, np.asarray(rows, np.float64) @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_an_expert_with_many_rows_gives_each_row_its_bits_alone(dtype):
    """A prefill's expert has tens of rows: several full row tiles and a short one, each block of the expert's
    weights shared by all of them. Every row gives the bits it gives alone, and stays within fp32 rounding."""
    rows = 21
    x, w = operands(dtype, rows=rows, seed=4)
    groups = np.array([0, rows, 0, 0, 0, 0], np.int32)
    full = np.asarray(kernels.grouped_matmul(x, jnp.asarray(groups), w))
    bound = 2 * K * np.finfo(np.float32).eps * reference(np.abs(np.asarray(x, np.float32)), groups, np.abs(w))
    assert np.all(np.abs(full - reference(x, groups, w)) <= bound + 1e-30)
    alone = jnp.asarray([0, 1, 0, 0, 0, 0], jnp.int32)
    for row in range(rows):
        out = np.asarray(kernels.grouped_matmul(x[row : row + 1], alone, w))
        assert np.array_equal(out[0], full[row]), row


def traced(fn, operands_, decoding: bool = True, invariant: bool = False, prefill: bool = False) -> str:
    """``fn``'s jaxpr in a decode step (or not), traced afresh (a new function: JAX caches traces by function, not
    by the mode switches)."""
    prefill_mode = kernels.prefill_mode() if prefill else contextlib.nullcontext()
    with decode_step_mode(decoding), batch_invariant_mode(invariant), prefill_mode:
        return str(jax.make_jaxpr(lambda *a: fn(*a))(*operands_))


def expert_operands(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    hidden, inter, rows = 32, 16, int(GROUPS.sum())
    x = jnp.asarray(rng.normal(size=(rows, hidden)), dtype)
    gate_up = jnp.asarray(rng.normal(0, 0.2, (E, hidden, 2 * inter)), dtype)
    down = jnp.asarray(rng.normal(0, 0.2, (E, inter, hidden)), dtype)
    return x, jnp.asarray(GROUPS), gate_up, down


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_expert_ffn_matches_the_xla_experts(dtype):
    operands_ = expert_operands(dtype)
    ours = np.asarray(moe.kernel_expert_ffn(*operands_), np.float32)
    theirs = np.asarray(moe.gather_expert_ffn(*operands_), np.float32)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: one rounding of h may land on either side
    np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=tolerance)


def test_decode_steps_use_the_kernel_in_both_modes_and_nothing_else_does():
    operands_ = expert_operands()
    assert "qwen_jax_grouped_matmul" in traced(moe.auto_expert_ffn, operands_)
    assert "qwen_jax_grouped_matmul" in traced(moe.invariant_expert_ffn, operands_, invariant=True)
    # A forward or prefill (the path that is differentiated) keeps XLA's experts.
    assert "qwen_jax_grouped_matmul" not in traced(moe.auto_expert_ffn, operands_, decoding=False)
    assert "qwen_jax_grouped_matmul" not in traced(moe.invariant_expert_ffn, operands_, False, invariant=True)


def test_fp32_prefills_use_the_kernel_in_both_modes_and_bf16_prefills_do_not():
    for invariant, ffn in ((False, moe.auto_expert_ffn), (True, moe.invariant_expert_ffn)):
        fp32, bf16 = expert_operands(), expert_operands(jnp.bfloat16)
        assert "qwen_jax_grouped_matmul" in traced(ffn, fp32, False, invariant, prefill=True)
        assert "qwen_jax_grouped_matmul" not in traced(ffn, bf16, False, invariant, prefill=True)


def test_generates_prefill_uses_the_kernel_and_forward_does_not(tiny_checkpoints):
    import qwen_jax
    from qwen_jax.generate import _prefill

    model = qwen_jax.load_hf(str(tiny_checkpoints("hv2hk_top2of8")), "float32")
    graphdef, params = nnx.split(model)
    ids = np.arange(1, 9, dtype=np.int32)[None]
    prefill = _prefill.lower(graphdef, params, ids, np.ones_like(ids), 16, "auto", False).as_text()
    assert "qwen_jax_grouped_matmul" in prefill
    assert "qwen_jax_grouped_matmul" not in jax.jit(lambda i: qwen_jax.forward(model, i)).lower(ids).as_text()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.enabled()
    assert "qwen_jax_grouped_matmul" not in traced(moe.auto_expert_ffn, expert_operands())


def test_without_a_compiler_one_warning_and_the_xla_path(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-qwen")
    kernels._registered.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not kernels.enabled()
            assert not kernels.enabled()  # asked again: no second warning
        assert len(caught) == 1 and "no C++ compiler" in str(caught[0].message)
        assert "qwen_jax_grouped_matmul" not in traced(moe.auto_expert_ffn, expert_operands())
    finally:
        monkeypatch.delenv("CXX")
        kernels._registered.cache_clear()


def test_a_failed_build_warns_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-no-such-flag-qwen"))
    kernels._registered.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU expert kernel is unavailable"):
            assert not kernels.enabled()
        assert list(tmp_path.iterdir()) == []  # no library, no temporary file
    finally:
        kernels._registered.cache_clear()


def test_bad_shapes_are_one_clear_error():
    x, w = operands(jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.grouped_matmul(x[:, :-1], jnp.asarray(GROUPS), w)


def test_a_decode_steps_single_bf16_row_goes_through_the_kernel():
    """``ops.dense`` of one bf16 row in a decode step (a batch-1 decode's projections and lm_head) uses the kernel,
    within one bf16 rounding of XLA's product; fp32, several rows and a forward keep XLA's."""
    from qwen_jax.ops import dense

    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(0, 0.1, (K, N)), jnp.bfloat16)
    row = jnp.asarray(rng.normal(size=(1, 1, K)), jnp.bfloat16)
    assert "qwen_jax_grouped_matmul" in traced(dense, (row, w))
    assert "qwen_jax_grouped_matmul" not in traced(dense, (row, w), decoding=False)
    assert "qwen_jax_grouped_matmul" not in traced(dense, (row.astype(jnp.float32), w.astype(jnp.float32)))
    assert "qwen_jax_grouped_matmul" not in traced(dense, (jnp.concatenate([row, row], 1), w))
    with decode_step_mode(True):  # fresh functions: JAX caches a trace by function, not by the mode
        ours = np.asarray(jax.jit(lambda r, w: dense(r, w))(row, w), np.float32)
    with decode_step_mode(False):
        theirs = np.asarray(jax.jit(lambda r, w: dense(r, w))(row, w), np.float32)
    assert ours.shape == (1, 1, N)
    np.testing.assert_allclose(ours, theirs, rtol=2**-7, atol=0)  # at most one bf16 ulp apart


def test_a_batch_1_bf16_decode_steps_lm_head_goes_through_the_kernel(tiny_checkpoints):
    """The whole model: in a batch-1 bf16 decode step no XLA dot produces the vocabulary's logits (the lm_head is the
    kernel's, under the decode step's mode as the layers are)."""
    from flax import nnx

    import qwen_jax
    from qwen_jax.generate import _prefill, decode_step

    model = qwen_jax.load_hf(tiny_checkpoints("hv2hk_top2of8"), dtype="bfloat16")
    graphdef, params = nnx.split(model)
    ids = np.arange(3, 11, dtype=np.int32)[None]
    _, cache = _prefill(graphdef, params, ids, np.ones_like(ids), 16, "auto", False)
    jaxpr = str(
        jax.make_jaxpr(lambda p, t, c: decode_step(nnx.merge(graphdef, p), t, c))(params, ids[:, 0], cache)
    )
    vocab = model.cfg.vocab_size
    assert "qwen_jax_grouped_matmul" in jaxpr
    assert not [
        line for line in jaxpr.splitlines() if "dot_general" in line and f",{vocab}]" in line.replace(" ", "")
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_large_product_split_over_threads_gives_the_bits_of_a_small_one(dtype):
    """A product large enough to be split by columns over threads (a batch-1 lm_head) gives, in its first columns,
    the bits of a product of those columns alone (one thread): no column's sum depends on the split."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 512)), dtype)
    w = jnp.asarray(rng.normal(size=(1, 512, 3 * 8192 + 40)), dtype)  # 12.6M weights: split over the cores
    one = jnp.ones((1,), jnp.int32)
    large = np.asarray(kernels.grouped_matmul(x, one, w))
    for start in (0, 8192, 3 * 8192 - 100):  # where a thread's columns begin or end, and the last columns
        small = np.asarray(kernels.grouped_matmul(x, one, w[:, :, start : start + 140]))
        assert np.array_equal(large[:, start : start + 140], small), start


# The delta rule's decode step. dv = 83: a 64-column block, a single vector and scalar columns (AVX-512 and AVX2
# alike); dk = 40.
HEADS, DK, DV = 4, 40, 83


def delta_operands(rows: int, heads: int = HEADS, dk: int = DK, dv: int = DV, seed: int = 7):
    """One decode step's fp32 operands as the DeltaNet makes them: q, k l2-normalised (q scaled by dk**-0.5)."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.normal(size=shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit((rows, 1, heads, dk)) * dk**-0.5
    k = unit((rows, 1, heads, dk))
    v = rng.normal(size=(rows, 1, heads, dv))
    g = -rng.uniform(0.0, 2.0, (rows, 1, heads))
    beta = rng.uniform(0.0, 1.0, (rows, 1, heads))
    state = rng.normal(0.0, 0.5, (rows, heads, dk, dv))
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta, state))


def delta_reference(q, k, v, g, beta, state):
    """float64 numpy of one step, from the same fp32 operands (decay = exp(g) in float64)."""
    q, k, v, g, beta, s = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, state))
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
    s = s * np.exp(g)[..., None, None]
    delta = (v - np.einsum("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    return np.einsum("bhkv,bhk->bhv", s, q)[:, None], s


def test_delta_rule_step_equals_the_float64_reference_and_xlas_step():
    """Five steps in sequence, each from the previous state: the kernel within fp32 rounding of a float64 step (from
    the same fp32 operands), and of XLA's ``delta_rule_step``."""
    from qwen_jax.delta_rule import delta_rule_step

    q, k, v, g, beta, state = delta_operands(3)
    xla_state = state
    step = jax.jit(kernels.delta_rule_step)
    for t in range(5):
        q, k, v, g, beta, _ = delta_operands(3, seed=100 + t)
        out, new_state = step(q, k, v, g, beta, state)
        ref_out, ref_state = delta_reference(q, k, v, g, beta, state)
        assert out.dtype == new_state.dtype == jnp.float32 and out.shape == (3, 1, HEADS, DV)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_state), ref_state, rtol=1e-6, atol=1e-6)
        xla_out, xla_state = delta_rule_step(q, k, v, g, beta, xla_state)
        np.testing.assert_allclose(np.asarray(out), np.asarray(xla_out), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_state), np.asarray(xla_state), rtol=1e-6, atol=1e-6)
        state = new_state


@pytest.mark.parametrize(("heads", "dk", "dv"), [(HEADS, DK, DV), (8, 64, 64), (2, 128, 128)])
def test_a_delta_rule_rows_bits_do_not_depend_on_the_batch(heads, dk, dv):
    """A row's output and state are the same bits alone, in the first 2 or 3 rows, and among 17 (a call large enough
    to be shared over the pool's threads: which thread computes a head changes no bit), for two steps."""
    rows = 17
    q, k, v, g, beta, state = delta_operands(rows, heads, dk, dv)
    step = jax.jit(kernels.delta_rule_step)
    full_out, full_state = step(q, k, v, g, beta, state)
    full_out, full_state = step(q, k, v, g, beta, full_state)
    full_out, full_state = np.asarray(full_out), np.asarray(full_state)
    for part in [slice(0, 2), slice(0, 3), *(slice(r, r + 1) for r in (0, 5, 16))]:
        args = [a[part] for a in (q, k, v, g, beta)]
        out, new_state = step(*args, state[part])
        out, new_state = step(*args, new_state)
        assert np.array_equal(np.asarray(out), full_out[part]), part
        assert np.array_equal(np.asarray(new_state), full_state[part]), part


def test_delta_rule_step_bad_shapes_and_dtypes_are_one_clear_error():
    q, k, v, g, beta, state = delta_operands(2)
    for bad in (
        (q[:, :, :, :-1], k, v, g, beta, state),
        (q, k, v[:, :, :-1], g, beta, state),
        (q, k, v, g[:, 0], beta, state),
        (q, k, v, g, beta, state[..., :-1]),
        (q, k, v, g, beta, state[0]),
        (q, k, v, g, beta.astype(jnp.bfloat16), state),
    ):
        with pytest.raises(ValueError, match="delta_rule_step: expected fp32"):
            kernels.delta_rule_step(*bad)


def test_an_invariant_decode_step_runs_the_delta_rule_in_the_kernel(tiny_checkpoints, monkeypatch):
    """In the batch-invariant mode a decode step's DeltaNet runs the kernel on all rows at once: the program has its
    custom call and no longer the per-row loop (no value of one row's [1, H, dk, dv] state); the default mode's
    decode step and the kernels switched off keep XLA's step."""
    import qwen_jax
    from qwen_jax.generate import _prefill, decode_step

    model = qwen_jax.load_hf(str(tiny_checkpoints("dk_ne_dv")), "float32")
    cfg = model.cfg
    graphdef, params = nnx.split(model)
    ids = np.arange(1, 7, dtype=np.int32).reshape(3, 2)
    _, cache = jax.eval_shape(
        lambda p: _prefill(graphdef, p, ids, np.ones_like(ids), 8, "auto", True), params
    )
    per_row_state = f"[1,{cfg.linear_num_value_heads},{cfg.linear_key_head_dim},{cfg.linear_value_head_dim}]"

    def program(invariant: bool) -> str:
        with batch_invariant_mode(invariant):
            step = jax.make_jaxpr(lambda p, t, c: decode_step(nnx.merge(graphdef, p), t, c))
            return str(step(params, ids[:, 0], cache)).replace(" ", "")

    def one_rows_state(text: str) -> list[str]:  # the per-row step's values on one row's state
        return [line for line in text.splitlines() if f"f32{per_row_state}" in line]

    invariant = program(True)
    assert "qwen_jax_delta_rule_step" in invariant
    assert not one_rows_state(invariant)
    assert "qwen_jax_delta_rule_step" not in program(False)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    switched_off = program(True)
    assert "qwen_jax_delta_rule_step" not in switched_off and one_rows_state(switched_off)


def attention_operands(
    rows: int, dtype, length: int = 300, q_heads: int = 8, kv_heads: int = 2, dim: int = 72
):
    """One query per row over ``length`` cached keys (dim 72: whole vectors and a partial one on any ISA), about a
    tenth of the keys not real, and each row at its own slot (the first key, a block edge, the last slot)."""
    rng = np.random.default_rng(rows)
    q = jnp.asarray(rng.normal(size=(rows, 1, q_heads, dim)), dtype)
    keys, values = (jnp.asarray(rng.normal(size=(rows, length, kv_heads, dim)), dtype) for _ in range(2))
    key_mask = jnp.asarray(rng.random((rows, length)) > 0.1, jnp.int32)
    slots = jnp.asarray(np.resize([0, 17, 255, 256, length - 1], rows), jnp.int32)
    return q, keys, values, key_mask, slots


def attention_reference(q, keys, values, key_mask, slots) -> np.ndarray:
    """float64 numpy softmax attention (no intermediate roundings) over each row's real keys at slots <= its own."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, keys, values))
    rows, _, q_heads, dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros((rows, 1, q_heads, dim))
    for b in range(rows):
        seen = (np.asarray(key_mask[b]) > 0) & (np.arange(k.shape[1]) <= int(slots[b]))
        for h in range(q_heads):
            scores = k[b, seen, h // group] @ q[b, 0, h] * dim**-0.5
            probs = np.exp(scores - scores.max())
            out[b, 0, h] = probs @ v[b, seen, h // group] / probs.sum()
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_the_float64_reference_and_the_xla_path(dtype):
    """Within fp32 rounding of float64 attention (bf16: within the scores' and probabilities' bf16 roundings, which
    both the kernel and XLA's path make), and of XLA's invariant path (:func:`qwen_jax.attention.invariant_attend`)."""
    from qwen_jax.attention import invariant_attend

    operands = attention_operands(5, dtype)
    out = np.asarray(jax.jit(kernels.decode_attention)(*operands), np.float64)
    q, keys, values, key_mask, slots = operands
    xla = np.asarray(invariant_attend(q, keys, values, key_mask, slots[:, None], 1), np.float64)
    tolerance = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, attention_reference(*operands), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(out, xla, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_decode_attention_rows_bits_do_not_depend_on_the_batch_or_the_cache_length(dtype):
    """A row's output is the same bits alone, among the first 2 or 3 rows, among 17 (shared over the pool's threads),
    and with its cache cut to its slot + 1 keys (the keys past its slot are not read)."""
    rows = 17
    q, keys, values, key_mask, slots = attention_operands(rows, dtype)
    attend = jax.jit(kernels.decode_attention)
    full = np.asarray(attend(q, keys, values, key_mask, slots), np.float32)
    for part in [slice(0, 2), slice(0, 3), *(slice(r, r + 1) for r in (0, 2, 16))]:
        out = attend(q[part], keys[part], values[part], key_mask[part], slots[part])
        assert np.array_equal(np.asarray(out, np.float32), full[part]), part
    for r in (1, 3):
        cut = int(slots[r]) + 1
        part = slice(r, r + 1)
        out = attend(q[part], keys[part, :cut], values[part, :cut], key_mask[part, :cut], slots[part])
        assert np.array_equal(np.asarray(out, np.float32), full[part]), r


def test_a_decode_attention_query_that_sees_no_key_gets_zeros():
    q, keys, values, key_mask, slots = attention_operands(2, jnp.float32)
    out = kernels.decode_attention(q, keys, values, key_mask.at[0].set(0), slots)
    assert np.array_equal(np.asarray(out[0]), np.zeros(out.shape[1:], np.float32))
    assert np.all(np.isfinite(np.asarray(out[1]))) and np.any(np.asarray(out[1]) != 0)


def test_decode_attention_bad_shapes_and_dtypes_are_one_clear_error():
    q, keys, values, key_mask, slots = attention_operands(2, jnp.float32)
    for bad in (
        (q[:, :, :-1], keys, values, key_mask, slots),  # 7 query heads over 2 KV heads
        (jnp.concatenate([q, q], axis=1), keys, values, key_mask, slots),  # two queries per row
        (q, keys, values[:, :-1], key_mask, slots),
        (q, keys, values, key_mask[:, :-1], slots),
        (q, keys, values, key_mask, slots[:1]),
        (q.astype(jnp.bfloat16), keys, values, key_mask, slots),
        (q[..., :-1], keys, values, key_mask, slots),
    ):
        with pytest.raises(ValueError, match="decode_attention: expected"):
            kernels.decode_attention(*bad)


def test_an_invariant_decode_step_runs_attention_in_the_kernel(tiny_checkpoints, monkeypatch):
    """In the batch-invariant mode a decode step's attention is the kernel's custom call; the default mode's decode
    step and the kernels switched off keep XLA's paths."""
    import qwen_jax
    from qwen_jax.generate import _prefill, decode_step

    model = qwen_jax.load_hf(str(tiny_checkpoints("dk_ne_dv")), "float32")
    graphdef, params = nnx.split(model)
    ids = np.arange(1, 7, dtype=np.int32).reshape(3, 2)
    _, cache = jax.eval_shape(
        lambda p: _prefill(graphdef, p, ids, np.ones_like(ids), 8, "auto", True), params
    )

    def program(invariant: bool) -> str:
        with batch_invariant_mode(invariant):
            step = jax.make_jaxpr(lambda p, t, c: decode_step(nnx.merge(graphdef, p), t, c))
            return str(step(params, ids[:, 0], cache))

    assert kernels.ATTENTION_TARGET in program(True)
    assert kernels.ATTENTION_TARGET not in program(False)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.ATTENTION_TARGET not in program(True)
