"""audit.journal: exact round trips, a torn last line dropped, another run's journal refused (exit 2 upstream).
The kill -9 and resume of a whole ``compare`` is tests/test_audit_resume.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audit.errors import AuditInputError
from audit.journal import JOURNAL, Journal

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
    assert json.loads(lines[0]) == {"journal": 1, **HEADER} and len(lines) == 6


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
        json.dumps({"journal": 1, **HEADER}) + "\nnot json\n{}\n", encoding="utf-8"
    )
    with pytest.raises(AuditInputError, match="line 2 is not JSON"):
        Journal.open(tmp_path, HEADER)
