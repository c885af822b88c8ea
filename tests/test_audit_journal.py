"""audit.journal: exact round trips, a torn last line dropped, another run's journal refused (exit 2 upstream).
The kill -9 and resume of a whole ``compare`` is tests/test_audit_resume.py (slow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from audit import jax_side, metrics
from audit.errors import AuditInputError
from audit.journal import JOURNAL, JOURNAL_FORMAT, Journal, journal_bytes_per_token
from audit.records import SequenceRecord, record_arrays, record_from_arrays

ROOT = Path(__file__).resolve().parents[1]

HEADER = {"contract": {"dtype": "bfloat16", "checkpoint_sha256": "ab" * 32}, "settings": {"seed": 1}}


def entry(k: int) -> dict:
    rng = np.random.default_rng(k)
    return {
        "hidden": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "ids": np.arange(k + 1, dtype=np.int32),
        "gap": float(rng.standard_normal()),
        "flag": np.bool_(True),
        "none": None,
    }


def test_entries_round_trip_exactly_and_are_not_duplicated(tmp_path):
    journal = Journal.open(tmp_path, HEADER)
    for k in range(3):
        journal.append("jax", k, entry(k))
    journal.append("reference", 0, entry(7))
    journal.append("jax", 1, entry(1))  # a repeated prompt replaces, never adds
    again = Journal.open(tmp_path, HEADER)
    done = again.done("jax")
    assert sorted(done) == [0, 1, 2] and sorted(again.done("reference")) == [0]
    for k, got in done.items():
        want = entry(k)
        for key in ("hidden", "ids"):
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
        assert (got["gap"], got["flag"], got["none"]) == (want["gap"], True, None)
    lines = (tmp_path / JOURNAL).read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"journal": JOURNAL_FORMAT, **HEADER} and len(lines) == 6


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path):
    journal = Journal.open(tmp_path, HEADER)
    journal.append("jax", 0, entry(0))
    path = tmp_path / JOURNAL
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"side": "jax", "prompt": 1, "data": {"hid')  # killed mid-write
    reopened = Journal.open(tmp_path, HEADER)
    assert sorted(reopened.done("jax")) == [0] and path.read_bytes() == whole
    reopened.append("jax", 1, entry(1))
    assert sorted(Journal.open(tmp_path, HEADER).done("jax")) == [0, 1]


def test_another_runs_journal_is_refused_in_one_line(tmp_path):
    Journal.open(tmp_path / "new", HEADER)
    assert not (tmp_path / "new").exists()  # nothing written before the first entry
    Journal.open(tmp_path, HEADER).append("jax", 0, entry(0))
    other = {**HEADER, "contract": {**HEADER["contract"], "checkpoint_sha256": "cd" * 32}}
    with pytest.raises(AuditInputError) as err:
        Journal.open(tmp_path, other)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / JOURNAL))
    assert "contract.checkpoint_sha256" in message and "another run" in message
    (tmp_path / JOURNAL).write_text(
        json.dumps({"journal": JOURNAL_FORMAT, **HEADER}) + "\nnot json\n{}\n", encoding="utf-8"
    )
    with pytest.raises(AuditInputError, match="line 2 is not JSON"):
        Journal.open(tmp_path, HEADER)


def test_a_journal_of_the_previous_format_is_refused_in_one_line(tmp_path):
    """Format 1 kept the JAX side's full hidden states of every prompt; its journals are refused (exit 2)."""
    (tmp_path / JOURNAL).write_text(json.dumps({"journal": 1, **HEADER}) + "\n", encoding="utf-8")
    with pytest.raises(AuditInputError) as err:
        Journal.open(tmp_path, HEADER)
    message = str(err.value)
    assert "\n" not in message and f"journal: 1 there, {JOURNAL_FORMAT} now" in message
    assert "remove it or choose another --report" in message


def _small_config():
    """The real config's shape, shrunk: 4 layers of 64, a vocabulary over the full-view limit (top-64 view)."""
    from qwen_jax.config import ModelConfig

    cfg = ModelConfig.qwen3_6_35b_a3b()
    return dataclasses.replace(
        cfg,
        vocab_size=metrics.FULL_VOCAB_LIMIT * 2,
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=cfg.layer_types[:4],
    )


def _journal_line_bytes(tmp_path: Path, cfg, positions: int, full: bool) -> dict[str, int]:
    """The lines each side journals for one prompt of ``positions`` teacher-forced positions, all of them generated
    (the most), written by the journal itself from what the run journals: the reference's record arrays and the
    JAX side's :func:`audit.jax_side.prompt_result`; with or without the full hidden states."""
    rng = np.random.default_rng(positions)
    n_states, k = cfg.num_hidden_layers + 1, cfg.num_experts_per_tok
    tokens = rng.integers(0, cfg.vocab_size, positions).astype(np.int32)
    hidden = rng.standard_normal((n_states, positions, cfg.hidden_size)).astype(np.float32)
    logits = rng.standard_normal((positions, cfg.vocab_size)).astype(np.float32)
    router = rng.integers(0, cfg.num_experts, (cfg.num_hidden_layers, positions, k + 1)).astype(np.int32)
    probs = rng.random((cfg.num_hidden_layers, positions, k + 1)).astype(np.float32)
    ref = SequenceRecord(
        0, tokens, tokens, hidden, router[..., :k], metrics.logit_view(logits), router, probs
    )
    ref = ref.summarised(keep_hidden=full)
    result = jax_side.prompt_result(ref, tokens, (logits, hidden, router[..., :k]), logits, cfg.num_experts)
    assert (result["hidden"] is not None) == full
    journal = Journal.open(tmp_path / f"{positions}-{full}", HEADER)
    journal.append("reference", 0, {"record": record_arrays(ref, keep_hidden=True), "bitwise": (True, 0.0)})
    journal.append("jax", 0, jax_side._journal_entry(result))
    lines = journal.path.read_bytes().splitlines(keepends=True)[1:]
    reread = Journal.open(journal.path.parent, HEADER)
    back = record_from_arrays(reread.done("reference")[0]["record"])
    assert np.array_equal(back.sketch, ref.sketch) and (back.hidden is not None) == full
    assert np.array_equal(reread.done("jax")[0]["sketch"], result["sketch"])
    return {"reference": len(lines[0]), "jax": len(lines[1])}


@pytest.mark.parametrize("full", [False, True], ids=["summaries", "full states"])
def test_journal_lines_take_the_formulas_bytes_per_position(tmp_path, full):
    """Per position (48 to 96: multiples of 3, so base64 adds exactly 4/3), each side's line grows by the formula's
    bytes, plus the full hidden states only for a prompt that keeps them."""
    cfg = _small_config()
    short, long = (_journal_line_bytes(tmp_path, cfg, n, full) for n in (48, 96))
    formula = journal_bytes_per_token(cfg)
    for side in ("reference", "jax"):
        assert (long[side] - short[side]) / 48 == pytest.approx(
            formula[side] + full * formula["full_hidden"], abs=1e-9
        ), side


def test_readme_states_the_full_size_journal_bytes_per_position():
    from qwen_jax.config import ModelConfig

    size = journal_bytes_per_token(ModelConfig.qwen3_6_35b_a3b())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key in ("jax", "reference", "total"):
        assert f"{size[key]:,.0f} bytes" in readme, key
