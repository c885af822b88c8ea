"""The JAX side's batching (audit.batching, audit.jax_side, audit.replay): buckets and batch plans; batched replay
and teacher forcing give exactly the batch-1 results (qwen_jax's batch-invariant mode); the compiled programs are
counted and bounded by the buckets; ``compare`` writes the same report at ``--batch-size`` 1 and 4 (slow)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from audit.batching import (
    MAX_BATCH,
    bucket_length,
    buckets_of,
    budget_class,
    default_batch_size,
    plan_batches,
    row_bytes,
    teacher_forced_rows,
)

# ----------------------------------------------------------------------------------------------------
# Buckets and plans (pure).


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 64, 65, 128, 129, 192, 193, 256, 257, 384, 385, 1500, 1537)] == [
        64, 64, 128, 128, 192, 192, 256, 256, 384, 384, 512, 1536, 2048,
    ]  # fmt: skip
    for n in range(1, 20000, 37):
        b = bucket_length(n)
        assert b >= n and b % 64 == 0 and (b == 64 or b < 2 * n) and (n <= 128 or b <= 1.5 * n)
    assert len({bucket_length(n) for n in range(1, 16385)}) == 16  # 64 .. 16384
    assert [budget_class(n) for n in (1, 64, 65, 256, 257, 10000)] == [64, 64, 256, 256, 1024, 16384]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_a_plan_covers_every_item_once_in_full_batches_sorted_by_length(batch_size):
    rng = random.Random(batch_size)
    lengths = [rng.randint(1, 1500) for _ in range(64)]
    budgets = [rng.choice([rng.randint(32, 256), rng.randint(300, 2000)]) for _ in range(64)]
    plan = plan_batches(lengths, budgets, batch_size)
    assert sorted(i for b in plan for i in b.indices) == list(range(64))
    rows = {}
    for b in plan:
        assert 1 <= len(b.indices) <= b.rows <= batch_size
        assert b.rows - len(b.indices) <= 1  # at most one filler row
        assert {budget_class(budgets[i]) for i in b.indices} == {budget_class(b.budget)}
        assert rows.setdefault(budget_class(b.budget), b.rows) == b.rows  # one row count per budget class
        assert b.length == bucket_length(max(lengths[i] for i in b.indices))
        assert b.budget == max(budgets[i] for i in b.indices)
        assert b.max_length == b.length + budget_class(b.budget)
    for size in rows:  # within a class: sorted by length, in the fewest batches
        members = [i for b in plan if budget_class(b.budget) == size for i in b.indices]
        assert [lengths[i] for i in members] == sorted(lengths[i] for i in members)
        assert sum(budget_class(b.budget) == size for b in plan) == -(-len(members) // batch_size)
    assert buckets_of(plan) == sorted({(b.length, b.max_length) for b in plan})


def test_the_unbucketed_plan_groups_equal_budgets_in_input_order():
    plan = plan_batches([5, 6, 7, 8, 9, 10], [4, 200, 200, 4, 200, 200], 3, bucket=None)
    assert [(b.indices, b.rows, b.budget, b.length) for b in plan] == [
        ((0, 3), 2, 4, None), ((1, 2, 4), 3, 200, None), ((5,), 1, 200, None),
    ]  # fmt: skip
    with pytest.raises(ValueError):
        plan_batches([1], [1], 0)


def test_the_default_batch_size_follows_the_memory_plan():
    from qwen_jax.config import ModelConfig

    cfg = ModelConfig.qwen3_6_35b_a3b()  # shapes only: nothing is allocated
    row = row_bytes(cfg, np.float32, 1000, 200)
    assert row > cfg.vocab_size * 1200 * 4  # at least the teacher-forced logits of 1,200 tokens
    assert default_batch_size(cfg, np.float32, 1000, 200, 10**6, None) == MAX_BATCH
    assert default_batch_size(cfg, np.float32, 1000, 200, 10**6, 10**6 + 2 * 16 * row) == 16
    assert default_batch_size(cfg, np.float32, 1000, 200, 10**6, 10**6 + 2 * 5 * row) == 4
    assert default_batch_size(cfg, np.float32, 1000, 200, 10**6, 10**6) == 1
    assert teacher_forced_rows(cfg, 8, 1024, 10**13) == 8 and teacher_forced_rows(cfg, 8, 1024, 1) == 1


# ----------------------------------------------------------------------------------------------------
# Batched = batch 1, on the demo checkpoint (fp32), in qwen_jax's batch-invariant mode.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(checkpoint dir, JAX model in float32, tokenizer bundle): the demo checkpoint's tokenizer and template, with
    the weights of the 4-layer tiny config "hv2hk_top2of8" (vocabulary 512), to keep the compiles short."""
    pytest.importorskip("torch")
    from audit import demo as demo_module
    from audit import hf_models
    from audit.prompts import load_checkpoint_tokenizer
    from qwen_jax.checkpoint import load_model_dir

    checkpoint = demo_module.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")
    model = hf_models.build_hf_model("hv2hk_top2of8", vocab_size=demo_module.MODEL_VOCAB)
    hf_models.save_checkpoint(model, checkpoint)  # replaces config.json and the weights
    return checkpoint, load_model_dir(checkpoint, "float32", None), load_checkpoint_tokenizer(checkpoint)


@pytest.mark.slow
def test_teacher_forcing_in_a_padded_batch_is_bitwise_the_sequence_alone(demo):
    from audit import jax_side

    _, model, _ = demo
    rng = np.random.RandomState(0)
    sequences = [rng.randint(0, 500, n).astype(np.int32) for n in (70, 9, 100)]
    batched = jax_side.teacher_forced_batch(model, sequences, rows=4, length=128)  # one filler row
    for tokens, got in zip(sequences, batched, strict=True):
        alone = jax_side.teacher_forced(model, tokens)
        assert [a.shape[-2 if a.ndim == 3 else 0] for a in got] == [len(tokens)] * 3
        for a, b in zip(got, alone, strict=True):
            np.testing.assert_array_equal(a, b)


def test_batched_replay_gives_the_batch_1_replies_and_bounded_programs(demo):
    """13 logged samples (all in the 384-token bucket with this tokenizer: one program shape per batch size)."""
    from mera_fixtures import AGRO, MED

    from audit import jax_side
    from audit.batching import ProgramCount
    from audit.replay import load_samples_files, replay_samples

    _, model, tokens = demo
    stop = (tokens.tokenizer.token_to_id("<|im_end|>"), tokens.tokenizer.token_to_id("<|endoftext|>"))
    files = load_samples_files([MED, AGRO])
    calls = {}

    def replay(batch_size):
        seen = calls.setdefault(batch_size, [])

        def generate(prompts, max_new_tokens):
            seen.append((len(prompts), max(len(p) for p in prompts), max_new_tokens))
            return jax_side.greedy(model, prompts, max_new_tokens, stop, batch_size)

        with ProgramCount() as programs:
            result = replay_samples(
                files,
                tokenizer=tokens.tokenizer,
                chat_template=tokens.template,
                generate=generate,
                max_new_tokens=8,
                batch_size=batch_size,
                bucket=bucket_length,
                stop_token_ids=stop,
            )
        return result, programs

    single, _ = replay(1)
    batched, programs = replay(4)
    assert batched == single  # every item: replies, final answers, scores, flags
    items = len(single.items)
    assert [n for n, _, _ in calls[1]] == [1] * items and len(calls[4]) == -(-items // 4)
    assert {n for n, _, _ in calls[4]} == {4}  # 13 items: 4, 3 + filler, 3 + filler, 3 + filler
    buckets = {(bucket_length(n), budget_class(budget)) for _, n, budget in calls[4]}
    assert programs.programs and all(n <= len(buckets) for n in programs.programs.values()), programs.programs


def without_run_details(value):
    """A report without its timestamps and the JAX side's batching summary (batch size, batches, compiled
    programs: how the run went, not what it found)."""
    if isinstance(value, dict):
        return {k: without_run_details(v) for k, v in value.items() if k not in ("created", "batching")}
    if isinstance(value, list):
        return [without_run_details(v) for v in value]
    return value


@pytest.mark.slow
def test_compare_writes_the_same_report_at_batch_size_1_and_4(tmp_path):
    """Two audits of the MERA fixtures on the demo checkpoint (both sides, fp32): the same report.json, item for
    item."""
    from mera_fixtures import AGRO, MED
    from test_audit_cli import read_report, run_audit

    from audit import demo as demo_module

    checkpoint = demo_module.build_demo_checkpoint(tmp_path / "checkpoint")
    args = ["compare", "--checkpoint", str(checkpoint), "--samples", str(MED), str(AGRO), "--limit", "4",
            "--max-new-tokens", "8", "--dtype", "float32", "--mesh", "none"]  # fmt: skip
    reports = {}
    for size in (1, 4):
        result = run_audit(*args, "--batch-size", str(size), "--report", str(tmp_path / str(size)))
        assert result.returncode in (0, 1), result.stdout + result.stderr
        assert f"jax batching: batch size {size}," in result.stdout
        reports[size] = read_report(tmp_path / str(size))
    batching = {size: r["manifest"]["jax"]["batching"] for size, r in reports.items()}
    assert batching[1]["batch_size"] == 1 and batching[4]["batch_size"] == 4
    assert batching[4]["greedy_batches"] < batching[1]["greedy_batches"] == 8
    assert all(b["compiled_programs_total"] > 0 for b in batching.values())
    items = {size: r["replay"]["items"] for size, r in reports.items()}
    assert len(items[1]) == 8 and items[1] == items[4]
    assert without_run_details(reports[1]) == without_run_details(reports[4])


@pytest.mark.slow
def test_the_replay_throughput_bench_runs_quick():
    """``bench/replay_throughput.py --quick`` (the bench config: a few minutes, mostly compiling)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "bench/replay_throughput.py", "--quick", "--batch-size", "4"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "replies identical at batch 1 and 4: yes" in result.stdout
        and "ratio batch 4 / batch 1" in result.stdout
    )
