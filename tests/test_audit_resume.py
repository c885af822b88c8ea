"""Resume after kill -9: ``compare`` is killed with SIGKILL once some prompts are journaled, rerun with the same
command, and its report.json equals an uninterrupted run's (timestamps aside); a journal of other settings is
refused with exit 2. Three audit runs (minutes on the shared 2-core machine): marked slow; the journal itself is
tested in the default run by tests/test_audit_journal.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_audit_cli import ROOT, read_report, run_audit

from audit import demo
from audit.journal import JOURNAL
from audit.records import DEFAULT_HIDDEN_STATES
from qwen_jax.cli_contract import EXIT_BAD_INPUT

pytestmark = pytest.mark.slow

PROMPTS = [{"name": f"p{k}", "messages": [{"role": "user", "content": f"Вопрос номер {k}: сколько будет {k}+{k}?"}]}
           for k in range(4)]  # fmt: skip


def without_timestamps(value):
    """Also without the JAX side's batching summary (manifest.jax.batching): a resumed run compiles and runs only
    the batches it has left, so its batch and program counts are its own."""
    if isinstance(value, dict):
        return {k: without_timestamps(v) for k, v in value.items() if k not in ("created", "batching")}
    if isinstance(value, list):
        return [without_timestamps(v) for v in value]
    return value


def entries(journal: Path) -> int:
    try:
        return max(0, journal.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def full_states_journaled(journal: Path) -> dict[str, list[int]]:
    """Per side, the prompts whose journal entry holds full hidden states."""
    kept = {"jax": [], "reference": []}
    for line in journal.read_text(encoding="utf-8").splitlines()[1:]:
        entry = json.loads(line)
        data = entry["data"]["record"] if entry["side"] == "reference" else entry["data"]
        if data.get("hidden") is not None:
            kept[entry["side"]].append(entry["prompt"])
    return {side: sorted(prompts) for side, prompts in kept.items()}


def test_kill_9_then_rerun_gives_the_uninterrupted_report(tmp_path):
    checkpoint = demo.build_demo_checkpoint(tmp_path / "checkpoint")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    args = ["compare", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--dtype", "float32",
            "--max-new-tokens", "6"]  # fmt: skip
    whole = run_audit(*args, "--report", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr

    report = tmp_path / "resumed"
    process = subprocess.Popen(
        [sys.executable, "-m", "audit", *args, "--report", str(report), "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while entries(report / JOURNAL) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = entries(report / JOURNAL)
    assert 2 <= killed_at < 2 * len(PROMPTS), killed_at  # killed part-way
    assert not (report / "report.json").exists()

    rerun = run_audit(*args, "--report", str(report))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert entries(report / JOURNAL) == 2 * len(PROMPTS)  # each prompt of each side journaled exactly once
    kept = full_states_journaled(report / JOURNAL)  # the default --hidden-states prompts only, on both sides
    assert kept == {side: list(range(DEFAULT_HIDDEN_STATES)) for side in ("jax", "reference")}, kept
    assert without_timestamps(read_report(report)) == without_timestamps(read_report(tmp_path / "whole"))

    other = run_audit(*args[:-1], "5", "--report", str(report))  # another --max-new-tokens
    assert other.returncode == EXIT_BAD_INPUT, other.stdout + other.stderr
    message = other.stderr.strip()
    assert "\n" not in message and "journal of another run" in message and "max_new_tokens" in message
