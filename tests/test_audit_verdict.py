"""The verdict on the submission, end to end: ``python -m audit compare --samples`` on a samples file whose logged
replies are the demo checkpoint's own exits 0; the same file with one logged reply edited names that item in the
terminal, classifies it as not reproduced by the reference either, and exits 1 (the finding code, not 2).

Three audit runs (about 5 minutes on the shared 2-core machine): marked slow. The classification itself is tested
in the default run by tests/test_replay.py::test_unreproduced_items_are_classified_against_the_reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mera_fixtures import MED
from test_audit_cli import read_report, run_audit

from audit import demo
from audit.replay import NOT_REPRODUCED_BY_REFERENCE
from audit.scoring import mera_process_results
from qwen_jax.cli_contract import EXIT_FINDING, EXIT_OK

pytestmark = pytest.mark.slow

ITEMS = 2
NEW_TOKENS = 8
# --thinking off with the matching split: the content is the whole (short) reply, not null
FLAGS = ("--dtype", "float32", "--max-new-tokens", str(NEW_TOKENS), "--limit", str(ITEMS))
FLAGS += ("--thinking", "off", "--reasoning-split", "qwen3_thinking_off")


def write_samples(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def set_reply(record: dict, reply: str, final: str) -> None:
    """Log ``reply`` as lm-eval would (resps, filtered_resps, MERA's metrics on the filtered reply)."""
    record["resps"], record["filtered_resps"] = [[reply]], [final]
    record.update(mera_process_results(record["doc"]["outputs"], final))


@pytest.fixture(scope="module")
def faithful(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The demo checkpoint, and the first ITEMS fixture samples with their logged replies replaced by what the
    audit replays (taken from a first audit run on the fixture as it is), max_gen_toks set to NEW_TOKENS."""
    root = tmp_path_factory.mktemp("verdict")
    checkpoint = demo.build_demo_checkpoint(root / "checkpoint")
    records = [json.loads(line) for line in MED.read_text(encoding="utf-8").splitlines()[:ITEMS]]
    for record in records:
        record["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] = NEW_TOKENS
    first = run_audit("compare", "--checkpoint", str(checkpoint), "--samples", str(MED), *FLAGS, "--report",
                      str(root / "first"))  # fmt: skip
    assert first.returncode == EXIT_FINDING, (
        first.stderr
    )  # the synthetic logs are not the demo model's replies
    items = read_report(root / "first")["replay"]["items"]
    assert all(i["classification"] == NOT_REPRODUCED_BY_REFERENCE for i in items if not i["reproduced"])
    for record, item in zip(records, items, strict=True):
        set_reply(record, item["replayed_reply"], item["replayed"])
    return checkpoint, write_samples(root / "faithful" / MED.name, records), items[0]


def test_a_faithful_log_is_reproduced(faithful, tmp_path):
    checkpoint, samples, _ = faithful
    result = run_audit("compare", "--checkpoint", str(checkpoint), "--samples", str(samples), *FLAGS,
                       "--report", str(tmp_path / "r"))  # fmt: skip
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "submission REPRODUCED" in result.stdout.splitlines()[0]
    verdict = read_report(tmp_path / "r")["verdict"]
    assert verdict["submission"]["status"] == "reproduced" and verdict["failed"] == []
    assert verdict["submission"]["reproduced_items"] == ITEMS


def test_an_edited_reply_is_named_and_fails_the_submission(faithful, tmp_path):
    checkpoint, samples, replayed = faithful
    records = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    edited = "Z" if replayed["replayed"] != "Z" else "Y"
    set_reply(records[0], edited, edited)
    copy = write_samples(tmp_path / "edited" / MED.name, records)
    result = run_audit("compare", "--checkpoint", str(checkpoint), "--samples", str(copy), *FLAGS,
                       "--report", str(tmp_path / "r"))  # fmt: skip
    assert result.returncode == EXIT_FINDING, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert (
        lines[0].startswith("VERDICT: port AGREE, submission NOT REPRODUCED")
        and "failed: submission" in lines[0]
    )
    named = [
        line for line in lines if line.startswith(f"  - med_bench doc {records[0]['doc_id']}: logged 'Z'")
    ]
    assert len(named) == 1, result.stdout
    assert f"{NOT_REPRODUCED_BY_REFERENCE}; final answer differs" in named[0]
    assert not any(f"med_bench doc {records[1]['doc_id']}:" in line for line in lines)
    report = read_report(tmp_path / "r")
    verdict = report["verdict"]
    assert verdict["status"] == "agree" and verdict["failed"] == ["submission"] and verdict["exit_code"] == 1
    assert verdict["submission"]["unreproduced_final_answers"] == 1
    item = report["replay"]["items"][0]
    assert (item["logged"], item["classification"], item["reference_replayed"]) == (
        "Z",
        NOT_REPRODUCED_BY_REFERENCE,
        replayed["replayed"],
    )
    assert "NOT REPRODUCED" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
