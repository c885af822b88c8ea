"""The batch-invariant mode (``batch_invariant=True``): a prompt's logits and greedy tokens are bitwise the same
alone, unpadded, and in any batch with other prompts of other lengths, right-padded into any bucket.

24 seeded prompts of 1-300 tokens per tiny config (two configs), fp32 and bf16, compared with ``np.array_equal``:
logits at every real position, and 32 greedy tokens with the logits they were chosen from. The full plan (slow set,
``-m slow``): every prompt in a batch of all 24 (bucket 512) and in at least one random batch of 2, 3, 8 or 17 prompts
(buckets 64, 256, 512, 320), the 1- and 300-token prompts also alone and unpadded; all four (config, dtype) pairs.
The default run, cut to its compile budget (each program compiles for seconds): the logits of one pair per dtype
alone (1 token), in the batch of all 24 and in the batches of 2 and 8; the bf16 greedy tokens of one config alone,
in the batch of 3 and in the batch of 8. The same on 2 and 8 fake devices (``ep`` mesh) against one device. The
invariant mode keeps the parity bounds against transformers. fp32 greedy decoding is checked in the slow set only
(its quick plan alone compiles for about a minute), also at a batch of exactly one row tile (16) against 17.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

import qwen_jax
from qwen_jax.generate import _decode_loop, _prefill, pad_prompts
from qwen_jax.invariance import ROW_TILE, batch_invariant_mode, map_row_tiles, right_padded

hf_reference = pytest.importorskip("hf_reference")
from test_model_parity import DISTANCE_FACTOR, FP32_ATOL, mean_kl, models  # noqa: E402

CONFIGS = ("hv2hk_top2of8", "dk_ne_dv")
NEW_TOKENS = 32
N_PROMPTS = 24
#: (batch size, bucket): the random batches each prompt may land in, besides the batch of all 24.
BATCHES = ((2, 64), (3, 256), (8, 512), (17, 320))
ALL_BUCKET = 512


@functools.cache
def prompts() -> tuple[tuple[int, ...], ...]:
    rng = np.random.default_rng(13)
    lengths = [1, 64, 65, 300, *rng.integers(1, 301, N_PROMPTS - 4)]
    return tuple(tuple(int(t) for t in rng.integers(0, 256, n)) for n in lengths)


#: A plan: (the prompts run alone and unpadded, the batches() used). The full plan (slow set) runs the 1- and
#: 300-token prompts alone and every batch, so that every prompt runs at least twice; the default run's plans are
#: cut to the compile budget of the default run (each program compiles for seconds) and compare the prompts that
#: run at least twice in them.
FULL = ((0, 3), (0, 1, 2, 3, 4))
QUICK_LOGITS = ((0,), (0, 1, 3))  # alone; all 24 at bucket 512; 2 at 64; 8 at 512
QUICK_GREEDY = ((0,), (2, 3))  # alone; 3 at 256; 8 at 512


@functools.cache
def batches() -> tuple[tuple[tuple[int, ...], int], ...]:
    """(prompt indices, bucket) of every batch: all 24, then the random ones. Every prompt lands in one of these
    (longest first, into the fullest-fitting bucket with room); the spare places get random prompts that fit."""
    rng = np.random.default_rng(7)
    lengths = [len(p) for p in prompts()]
    rows: list[list[int]] = [[] for _ in BATCHES]
    for i in sorted(rng.permutation(N_PROMPTS), key=lambda i: -lengths[i]):
        room = [b for b, (size, bucket) in enumerate(BATCHES) if len(rows[b]) < size and lengths[i] <= bucket]
        rows[min(room, key=lambda b: BATCHES[b][1])].append(int(i))
    for b, (size, bucket) in enumerate(BATCHES):
        spare = [i for i in range(N_PROMPTS) if lengths[i] <= bucket and i not in rows[b]]
        rows[b] += [int(i) for i in rng.choice(spare, size - len(rows[b]), replace=False)]
        rows[b] = [rows[b][k] for k in rng.permutation(size)]
    return (
        (tuple(range(N_PROMPTS)), ALL_BUCKET),
        *((tuple(r), bucket) for r, (_, bucket) in zip(rows, BATCHES, strict=True)),
    )


def model(name: str, dtype: str, tiny_checkpoints):
    return models(name, dtype, str(tiny_checkpoints(name)))[1]


@functools.cache
def forward_runs(name: str, dtype: str, path: str, plan) -> dict[int, list[np.ndarray]]:
    """{prompt index: its logits [n, vocab] from every run of ``plan`` it was in}, the alone run first."""
    jax_model = models(name, dtype, path)[1]
    runs: dict[int, list[np.ndarray]] = {i: [] for i in range(N_PROMPTS)}
    alone, used = plan
    for i in alone:
        runs[i].append(
            np.asarray(qwen_jax.forward(jax_model, np.array([prompts()[i]]), batch_invariant=True))[0]
        )
    for rows, bucket in (batches()[b] for b in used):
        ids, mask = pad_prompts([prompts()[i] for i in rows], bucket, right=True)
        assert ids.shape[1] == bucket
        logits = np.asarray(qwen_jax.forward(jax_model, ids, mask, batch_invariant=True))
        for row, i in enumerate(rows):
            runs[i].append(logits[row, : len(prompts()[i])])
    return runs


@functools.cache
def generate_runs(name: str, dtype: str, path: str, plan) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """{prompt index: (tokens, logits) of its 32 greedy tokens from every run of ``plan`` it was in}, alone first."""
    jax_model = models(name, dtype, path)[1]
    runs: dict[int, list] = {i: [] for i in range(N_PROMPTS)}

    def run(rows, bucket):
        out = qwen_jax.generate(
            jax_model,
            [list(prompts()[i]) for i in rows],
            max_new_tokens=NEW_TOKENS,
            stop_token_ids=(),
            pad_to_multiple=bucket,
            return_logits=True,
            batch_invariant=True,
        )
        for row, i in enumerate(rows):
            runs[i].append((out.tokens[row], out.logits[row]))

    alone, used = plan
    for i in alone:
        run((i,), 1)
    for b in used:
        run(*batches()[b])
    return runs


def assert_all_equal(runs: dict, what: str, plan) -> None:
    """Every prompt's runs bitwise equal; under the full plan every prompt ran at least twice."""
    compared = [i for i, results in runs.items() if len(results) >= 2]
    assert len(compared) == N_PROMPTS if plan == FULL else len(compared) >= 3, compared
    for i in compared:
        results = runs[i]
        for k, other in enumerate(results[1:], 1):
            for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (results[0], other)), strict=True):
                assert np.array_equal(a, b), (
                    f"prompt {i} ({len(prompts()[i])} tokens): {what} of run {k} differ from run 0 "
                    f"(max {np.abs(a.astype(np.float64) - b.astype(np.float64)).max():.3g})"
                )


COMBOS = [(name, dtype) for name in CONFIGS for dtype in ("float32", "bfloat16")]
#: The (config, dtype) pairs of the default run (test budget); -m slow runs the other two as well.
DEFAULT_PAIRS = (("hv2hk_top2of8", "float32"), ("dk_ne_dv", "bfloat16"))


def logits_case(name: str, dtype: str, plan: str):
    slow = plan == "full" or (name, dtype) not in DEFAULT_PAIRS
    return pytest.param(name, dtype, plan, id=f"{name}-{dtype}-{plan}", marks=[pytest.mark.slow] * slow)


@pytest.mark.parametrize(
    "name,dtype,plan", [logits_case(n, d, plan) for n, d in COMBOS for plan in ("quick", "full")]
)
def test_logits_do_not_depend_on_the_batch(name, dtype, plan, tiny_checkpoints):
    plan = FULL if plan == "full" else QUICK_LOGITS
    assert_all_equal(forward_runs(name, dtype, str(tiny_checkpoints(name)), plan), "logits", plan)


def greedy_case(name: str, dtype: str, plan: str):
    marks = [pytest.mark.slow] if plan == "full" or (name, dtype) != ("dk_ne_dv", "bfloat16") else []
    return pytest.param(name, dtype, plan, id=f"{name}-{dtype}-{plan}", marks=marks)


GREEDY_CASES = [greedy_case(name, dtype, plan) for name, dtype in COMBOS for plan in ("quick", "full")]


@pytest.mark.parametrize("name,dtype,plan", GREEDY_CASES)
def test_greedy_tokens_do_not_depend_on_the_batch(name, dtype, plan, tiny_checkpoints):
    """The 32 greedy tokens and the logits they were chosen from. Default run: dk_ne_dv bf16, quick plan (the
    bf16 mesh test decodes too); the slow set: the other pairs (fp32 among them) and the full plan."""
    plan = FULL if plan == "full" else QUICK_GREEDY
    runs = generate_runs(name, dtype, str(tiny_checkpoints(name)), plan)
    assert_all_equal(runs, "greedy tokens and their logits", plan)


@pytest.mark.slow
def test_fp32_greedy_tokens_at_one_full_row_tile(tiny_checkpoints):
    """fp32 greedy decoding at batch ROW_TILE, where each per-token tile map (projections, norms, router) runs once on
    a full tile, gives every row the tokens and logits it gets at ROW_TILE + 1 (two tiles), and a prompt alone the
    same. Before opaque_map's spare entry XLA hoisted that single tile out of its loop and fused it with its
    producers: a row's logits moved by 1.4e-6 at batch 16 against 17 (measured). The plans above have no such
    batch."""
    jax_model = model("hv2hk_top2of8", "float32", tiny_checkpoints)
    rows = [list(p) for p in prompts()[: ROW_TILE + 1]]

    def run(batch):
        return qwen_jax.generate(
            jax_model,
            batch,
            max_new_tokens=8,
            stop_token_ids=(),
            pad_to_multiple=64,
            return_logits=True,
            batch_invariant=True,
        )

    full, two_tiles, alone = run(rows[:ROW_TILE]), run(rows), run(rows[:1])
    assert np.array_equal(full.tokens, two_tiles.tokens[:ROW_TILE])
    assert np.array_equal(full.logits, two_tiles.logits[:ROW_TILE])
    assert np.array_equal(full.tokens[0], alone.tokens[0]) and np.array_equal(full.logits[0], alone.logits[0])


#: The prompts checked against transformers (1, 64, 65 and 300 tokens), as they came out of the batch of all 24.
PARITY_PROMPTS = (0, 1, 2, 3)


def in_batch_of_all(runs: dict, i: int) -> np.ndarray:
    return runs[i][len(QUICK_LOGITS[0]) if i in QUICK_LOGITS[0] else 0]


def parity_configs(dtype: str) -> list:
    """Both configs; the one whose invariance runs are not in the default run is in the slow set (test budget)."""
    return [
        pytest.param(name, marks=[pytest.mark.slow] * ((name, dtype) not in DEFAULT_PAIRS))
        for name in CONFIGS
    ]


@pytest.mark.parametrize("name", parity_configs("float32"))
def test_fp32_invariant_mode_keeps_parity_with_hf(name, tiny_checkpoints):
    hf = models(name, "float32", str(tiny_checkpoints(name)))[0]
    runs = forward_runs(name, "float32", str(tiny_checkpoints(name)), QUICK_LOGITS)
    for i in PARITY_PROMPTS:
        ref, _ = hf_reference.hf_forward(hf, np.array([prompts()[i]]))
        np.testing.assert_allclose(
            in_batch_of_all(runs, i), ref[0], rtol=0, atol=FP32_ATOL, err_msg=f"prompt {i}"
        )


@pytest.mark.parametrize("name", parity_configs("bfloat16"))
def test_bf16_invariant_mode_keeps_the_calibrated_criterion(name, tiny_checkpoints):
    """As tests/test_model_parity.py's bf16 test: within 2e of HF-bf16 in max |diff| (e = HF-bf16 vs HF-fp32), within
    e in mean KL, top-1 agreement >= 99%, over the parity prompts."""
    path = str(tiny_checkpoints(name))
    hf32, hf16 = models(name, "float32", path)[0], models(name, "bfloat16", path)[0]
    runs = forward_runs(name, "bfloat16", path, QUICK_LOGITS)
    ours, ref16, ref32 = [], [], []
    for i in PARITY_PROMPTS:
        ids = np.array([prompts()[i]])
        ref32.append(hf_reference.hf_forward(hf32, ids)[0][0])
        ref16.append(hf_reference.hf_forward(hf16, ids)[0][0])
        ours.append(in_batch_of_all(runs, i).astype(np.float64))
    ours, ref16, ref32 = (np.concatenate(x) for x in (ours, ref16, ref32))
    assert np.abs(ours - ref16).max() <= DISTANCE_FACTOR * np.abs(ref16 - ref32).max()
    assert mean_kl(ref16, ours) <= mean_kl(ref32, ref16)
    assert (ours.argmax(-1) == ref16.argmax(-1)).mean() >= 0.99


def test_compiled_programs_are_bounded_by_the_buckets(tiny_checkpoints):
    """Mixed-length prompts grouped into buckets: one prefill and one decode loop per (batch size, bucket) used,
    however many distinct lengths there are."""
    jax_model = model("hv2hk_top2of8", "float32", tiny_checkpoints)
    lengths = (3, 17, 40, 63, 64, 70, 100, 127)  # 8 lengths in buckets 64 and 128
    rng = np.random.default_rng(0)
    groups: dict[int, list] = {}
    for n in lengths:
        groups.setdefault(-(-n // 64) * 64, []).append(list(rng.integers(0, 256, n)))
    before = (_prefill._cache_size(), _decode_loop._cache_size())
    for group in groups.values():
        for start in range(0, len(group), 2):  # batches of up to 2 (the last one may be smaller)
            qwen_jax.generate(
                jax_model,
                group[start : start + 2],
                max_new_tokens=2,
                stop_token_ids=(),
                pad_to_multiple=64,
                max_length=256,
                batch_invariant=True,
            )
    prefills = _prefill._cache_size() - before[0]
    loops = _decode_loop._cache_size() - before[1]
    shapes = {(min(2, len(g) - s), b) for b, g in groups.items() for s in range(0, len(g), 2)}
    assert prefills <= len(shapes) and loops <= len({size for size, _ in shapes}), (prefills, loops, shapes)


def test_row_tiles_are_bitwise_independent_of_the_other_rows():
    """The building block: a per-row function mapped over fixed tiles gives every row the same bits whatever the
    number of rows and its place in them; without the tiles the same matmul and RMSNorm do not (measured)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.norms import rms_norm
    from qwen_jax.ops import dense

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 384)) * 0.05, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(256), jnp.float32)

    def both(rows):
        return dense(rows, w), rms_norm(rows, scale, 1e-6)

    def invariant(rows):
        with batch_invariant_mode():
            return both(rows)

    alone = [jax.jit(invariant)(x[i : i + 1]) for i in (0, 5, 39)]
    for m in (2, 3, 8, 17, 40):
        tiled = jax.jit(invariant)(x[:m])
        for i, a in zip((0, 5, 39), alone, strict=True):
            if i < m:
                for ours, ref in zip(tiled, a, strict=True):
                    assert np.array_equal(ours[i], ref[0]), (m, i)
    plain = [jax.jit(both)(x[:m])[0][0] for m in (1, 2, 3, 8, 17, 40)]
    assert not all(np.array_equal(plain[0], p) for p in plain[1:]), "XLA's matmul became batch-invariant"
    assert map_row_tiles(lambda r: r * 2, x[:3]).shape == (3, 256) and ROW_TILE == 16


def test_batch_invariant_mode_needs_right_padding(tiny_checkpoints):
    jax_model = model("hv2hk_top2of8", "float32", tiny_checkpoints)
    ids, mask = pad_prompts([[1, 2, 3], [4]], 1)  # left-padded
    assert not right_padded(mask) and right_padded(pad_prompts([[1, 2, 3], [4]], 1, right=True)[1])
    with pytest.raises(ValueError, match="right-padded"):
        qwen_jax.forward(jax_model, ids, mask, batch_invariant=True)
    with pytest.raises(ValueError, match="right-padded"):
        qwen_jax.generate(jax_model, ids, mask, max_new_tokens=2, batch_invariant=True)
    with pytest.raises(ValueError, match="not batch-invariant"):
        qwen_jax.forward(jax_model, ids[:1], batch_invariant=True, moe_backend="ragged")


def test_stream_generate_gives_the_invariant_tokens(tiny_checkpoints):
    jax_model = model("hv2hk_top2of8", "float32", tiny_checkpoints)
    prompt = list(prompts()[2])
    streamed = list(
        qwen_jax.stream_generate(jax_model, prompt, max_new_tokens=8, stop_token_ids=(), batch_invariant=True)
    )
    batched = qwen_jax.generate(
        jax_model,
        [prompt, list(prompts()[5])],
        max_new_tokens=8,
        stop_token_ids=(),
        batch_invariant=True,
    )
    assert streamed == list(batched.tokens[0])


MESH_SCRIPT = r"""
import sys
import jax, numpy as np
jax.config.update("jax_cpu_enable_async_dispatch", False)
import qwen_jax
from qwen_jax.generate import pad_prompts
from qwen_jax.sharding import make_mesh, shard_model

assert len(jax.devices()) == 8
model = qwen_jax.load_hf(sys.argv[1], sys.argv[2])
rng = np.random.default_rng(3)
prompts = [list(rng.integers(0, 256, n)) for n in (1, 40, 65, 130)]
ids, mask = pad_prompts(prompts, 192, right=True)

def run(m):
    logits = np.asarray(qwen_jax.forward(m, ids, mask, batch_invariant=True))
    out = qwen_jax.generate(m, prompts, max_new_tokens=8, stop_token_ids=(), return_logits=True,
                            pad_to_multiple=192, batch_invariant=True)
    return logits, out.tokens, out.logits

reference = run(model)
# one device: a prompt alone, unpadded, gives what it gives in the batch
alone = qwen_jax.generate(model, [prompts[2]], max_new_tokens=8, stop_token_ids=(), return_logits=True,
                          pad_to_multiple=1, batch_invariant=True)
assert np.array_equal(reference[1][2], alone.tokens[0]) and np.array_equal(reference[2][2], alone.logits[0])
for ep in (2, 8):
    mesh = make_mesh(ep, devices=jax.devices()[:ep])
    with jax.set_mesh(mesh):
        ours = run(shard_model(model, mesh))
    for a, b in zip(ours, reference):
        assert np.array_equal(a, b), f"ep={ep} differs from one device: {np.abs(a - b).max()}"
    print(f"ep={ep} bitwise equal to one device")
"""


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
def test_expert_parallel_invariant_mode_equals_one_device(dtype, tiny_checkpoints):
    """On 2 and 8 fake devices (``ep`` mesh) the invariant mode gives one device's logits, greedy tokens and their
    logits bit for bit, with a prompt alone equal to it in a batch (the default mode differs across meshes by up to
    2e-5: tests/test_sharding.py). fp32 in the slow set."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(tiny_checkpoints("hv2hk_top2of8")), dtype],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, XLA_FLAGS=flags.strip()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bitwise equal to one device") == 2
