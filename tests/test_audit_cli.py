"""``python -m audit``: the demo end to end, a deliberately broken conversion caught and localised, the reference
bundle read without torch, and bad inputs answered with one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("torch")

from mera_fixtures import FIXTURES

from audit import cli, demo
from audit.report import validate_report

ROOT = Path(__file__).resolve().parents[1]
ALTERED_LAYER = 5  # a DeltaNet layer of the second group
AUDIT_TIMEOUT = 600


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [
        {"name": "chat", "messages": [{"role": "user", "content": "Какой гормон снижает уровень глюкозы?"}]},
        {"name": "raw text", "text": "Вопрос: Какие культуры относятся к зерновым? Ответ:"},
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def run_audit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audit", *args, "--no-progress"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=AUDIT_TIMEOUT,
    )


def read_report(directory: Path) -> dict:
    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    validate_report(report)
    assert (directory / "report.html").is_file()
    return report


def test_demo_out_of_the_box(tmp_path):
    """No arguments: builds and caches the demo checkpoint, runs both sides, agrees, exit 0."""
    result = run_audit(
        "compare", "--report", str(tmp_path / "report"), env={"QWEN_JAX_AUDIT_CACHE": str(tmp_path)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VERDICT: AGREE" in result.stdout
    assert (demo.demo_checkpoint_dir().name in os.listdir(tmp_path)) or any(tmp_path.glob("demo-*"))
    report = read_report(tmp_path / "report")
    assert report["verdict"]["status"] == "agree" and report["tolerances"]["source"] == "calibrated"
    assert len(report["prompts"]) == len(demo.DEMO_PROMPTS)
    assert report["greedy"]["exact_match_rate"] == 1.0
    assert all(check["passed"] for check in report["determinism"] if check["kind"] == "bitwise")


def most_used_expert(checkpoint: Path, prompts: list[list[int]], layer: int) -> int:
    import qwen_jax

    model = qwen_jax.load_hf(checkpoint, "float32")
    counts = np.zeros(model.cfg.num_experts, int)
    for ids in prompts:
        out = qwen_jax.forward(model, np.asarray([ids]), return_hidden_states=True)
        counts += np.bincount(np.asarray(out.routing[layer].experts).ravel(), minlength=len(counts))
    return int(counts.argmax())


def test_an_altered_expert_is_caught_and_localised(demo_dir, tmp_path):
    """The JAX side from a conversion where one expert of one layer was changed: exit 1, and the first layer
    over tolerance is that layer. Run on replayed MERA samples, which also drives the replay end to end."""
    from audit.prompts import PromptSpec, load_checkpoint_tokenizer, render_all
    from audit.samples import read_samples

    samples = sorted(FIXTURES.glob("samples_med_bench_*.jsonl"))
    tokens = load_checkpoint_tokenizer(demo_dir)
    specs = [PromptSpec("s", messages=tuple(s.messages())) for s in list(read_samples(samples[0]))[:2]]
    expert = most_used_expert(demo_dir, [list(p.ids) for p in render_all(specs, tokens)], ALTERED_LAYER)

    altered = tmp_path / "altered"
    shutil.copytree(demo_dir, altered)
    tensors = load_file(altered / "model.safetensors")
    key = f"model.layers.{ALTERED_LAYER}.mlp.experts.down_proj"
    tensors[key][expert] *= 10.0
    save_file(tensors, altered / "model.safetensors", metadata={"format": "pt"})

    report_dir = tmp_path / "report"
    result = run_audit(
        "compare",
        "--checkpoint",
        str(demo_dir),
        "--jax-checkpoint",
        str(altered),
        "--samples",
        str(samples[0]),
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--report",
        str(report_dir),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = read_report(report_dir)
    first = report["verdict"]["first_diverging_layer"]
    assert first == ALTERED_LAYER + 1, report["verdict"]  # hidden state i is the output of layer i - 1
    assert report["layers"][first]["name"].startswith(f"layer {ALTERED_LAYER} ")
    assert not any(layer["exceeds"] for layer in report["layers"][:first])
    assert f"layer {ALTERED_LAYER} (linear_attention)" in result.stdout
    assert any(d["key"] == "checkpoint_sha256" for d in report["manifest"]["differences"])
    replay = report["replay"]
    assert replay is not None and replay["tasks"][0]["items"] == 2 and len(replay["items"]) == 2


@pytest.mark.slow  # (test budget: ~57 s; tests/test_records.py checks a demo bundle in the default run)
def test_bundle_round_trip_without_torch(demo_dir, prompts_file, tmp_path):
    """record (torch) -> compare --reference in a process where importing torch fails, with the JAX side from an
    Orbax conversion (same checkpoint digest as its source). A changed seed is a contract difference: warned about
    loudly, on stderr, in the summary and in the report."""
    bundle = tmp_path / "bundle"
    recorded = run_audit(
        "record",
        "--checkpoint",
        str(demo_dir),
        "--prompts",
        str(prompts_file),
        "--max-new-tokens",
        "8",
        "--out",
        str(bundle),
    )
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert (bundle / "manifest.json").is_file() and not list(tmp_path.glob(".bundle.*"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["seed"] == 1234
    assert manifest["versions"]["torch"] and manifest["checkpoint_sha256"]

    blocker = tmp_path / "no_torch"
    for name in ("torch", "transformers"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    orbax = tmp_path / "orbax"
    converted = subprocess.run(
        [
            sys.executable,
            "-m",
            "conversion",
            "convert",
            "--hf",
            str(demo_dir),
            "--out",
            str(orbax),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=AUDIT_TIMEOUT,
    )
    assert converted.returncode == 0, converted.stderr
    report_dir = tmp_path / "report"
    result = run_audit(
        "compare",
        "--reference",
        str(bundle),
        "--checkpoint",
        str(demo_dir),
        "--jax-checkpoint",
        str(orbax),
        "--seed",
        "1",
        "--report",
        str(report_dir),
        env={"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(report_dir)
    assert report["settings"]["reference_source"] == "bundle"
    assert [d["key"] for d in report["manifest"]["differences"]] == ["seed"]
    assert any("seed" in w for w in report["warnings"]) and "seed" in result.stdout
    assert "WARNING: the reference was run with seed = 1234" in result.stderr
    assert report["settings"]["jax_checkpoint"] == str(orbax)


@pytest.mark.parametrize(
    "case",
    ["missing checkpoint", "malformed samples", "missing tokenizer", "malformed prompts", "missing bundle"],
)
def test_bad_inputs_one_line_and_exit_2(case, demo_dir, prompts_file, tmp_path, capsys):
    args = ["compare", "--checkpoint", str(demo_dir), "--report", str(tmp_path / "r"), "--no-progress"]
    if case == "missing checkpoint":
        args[2] = str(tmp_path / "nowhere")
        args += ["--prompts", str(prompts_file)]
        expected = "nowhere: checkpoint directory not found"
    elif case == "malformed samples":
        bad = tmp_path / "samples_med_bench_2026-05-01T10-15-30.123456.jsonl"
        good = sorted(FIXTURES.glob("samples_med_bench_*.jsonl"))[0].read_text(encoding="utf-8").splitlines()
        bad.write_text("\n".join([good[0], "{not json", *good[1:]]) + "\n", encoding="utf-8")
        args += ["--samples", str(bad)]
        expected = f"{bad.name}:2"
    elif case == "missing tokenizer":
        copy = tmp_path / "no_tokenizer"
        shutil.copytree(demo_dir, copy)
        (copy / "tokenizer.json").unlink()
        args[2] = str(copy)
        args += ["--prompts", str(prompts_file)]
        expected = "no tokenizer.json"
    elif case == "malformed prompts":
        bad = tmp_path / "prompts.jsonl"
        bad.write_text('{"text": "ok"}\n{"messages": "not a list"}\n', encoding="utf-8")
        args += ["--prompts", str(bad)]
        expected = "prompts.jsonl:2"
    else:
        args = ["compare", "--reference", str(tmp_path / "no_bundle"), "--checkpoint", str(demo_dir)]
        expected = "no_bundle: reference bundle directory not found"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "r").exists()


def test_a_template_other_than_qwen36_is_flagged(demo_dir, tmp_path):
    from audit.prompts import load_checkpoint_tokenizer

    copy = tmp_path / "other_template"
    shutil.copytree(demo_dir, copy)
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    warnings = load_checkpoint_tokenizer(copy).warnings
    assert len(warnings) == 1 and "differs from the Qwen3.6 template" in warnings[0]
    assert load_checkpoint_tokenizer(demo_dir).warnings == ()


@pytest.mark.parametrize("thinking", [None, "off"])
def test_thinking_switch_renders_logged_samples(thinking, demo_dir):
    """--thinking off renders the logged messages with enable_thinking=false (an empty think block is primed)."""
    from audit.run import Inputs

    samples = sorted(FIXTURES.glob("samples_med_bench_*.jsonl"))[:1]
    args = cli.build_parser().parse_args(
        ["compare", "--checkpoint", str(demo_dir), "--samples", *map(str, samples), "--limit", "1"]
        + ([] if thinking is None else ["--thinking", thinking])
    )
    text = Inputs.from_args(args).prompts[0].text
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n" if thinking == "off" else "<think>\n"
    )


def test_sample_selects_the_same_items_for_both_sides(demo_dir):
    """--sample N --sample-seed S renders the subset that the replay replays (audit.replay.select_samples)."""
    from audit.replay import load_samples_files, select_samples
    from audit.run import Inputs

    samples = sorted(FIXTURES.glob("samples_*_bench_*.jsonl"))[:2]
    argv = ["compare", "--checkpoint", str(demo_dir), "--samples", *map(str, samples), "--sample", "2"]
    args = cli.build_parser().parse_args([*argv, "--sample-seed", "5"])
    names = [p.name for p in Inputs.from_args(args).prompts]
    assert names == [
        f"{sf.task} doc {s.doc_id}"
        for sf in load_samples_files(samples)
        for s in select_samples(sf, sample=(2, 5))
    ]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*argv, "--limit", "1"])  # --limit and --sample exclude each other
