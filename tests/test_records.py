"""Records that scale: per-position summaries of the hidden states (norms and seeded sketches) instead of every
hidden state, the compare that localises a divergence from them, and the bundle (format 2) with its size per
position against the formula."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from audit_reports import synthetic_report

from audit import cli, determinism, metrics
from audit.errors import AuditInputError
from audit.jax_side import JaxRun
from audit.records import (
    BUNDLE_FORMAT,
    Prompt,
    ReferenceRun,
    SequenceRecord,
    bundle_bytes_per_token,
    bundle_size,
    full_hidden_bytes_per_token,
    full_size_bytes_per_token,
    load_bundle,
    save_bundle,
)
from audit.report import render_html, terminal_summary, validate_report

ROOT = Path(__file__).resolve().parents[1]
N_STATES, LENGTH, WIDTH, VOCAB, K = 5, 150, 64, 16, 2


def _hidden(seed: int, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N_STATES, length, WIDTH)).astype(np.float32)


def _estimate(ref: np.ndarray, ours: np.ndarray) -> list[metrics.LayerDiff]:
    """layer_diffs with the reference's full states dropped: summaries only."""
    return metrics.layer_diffs([metrics.HiddenStates(None, *metrics.summarise_hidden(ref))], [ours])


@pytest.mark.parametrize("direction", ["independent", "the same at every position"])
def test_summaries_estimate_rel_diff_and_are_exactly_zero_where_equal(direction):
    """The sketch gives an unbiased estimate of sum ||x - y||^2: within 10% of the exact rel_diff, also when the
    departure points the same way at every position (the pool of projections decorrelates it); equal states give
    exactly 0."""
    ref = _hidden(0)
    ours = ref.copy()
    rng = np.random.default_rng(1)
    if direction == "independent":
        delta = rng.normal(size=(LENGTH, WIDTH))
    else:
        delta = np.broadcast_to(rng.normal(size=WIDTH), (LENGTH, WIDTH))
    ours[3:] += (1e-3 * delta).astype(np.float32)
    exact = metrics.layer_diffs([ref], [ours])
    estimated = _estimate(ref, ours)
    assert [d.rel_diff for d in estimated[:3]] == [0.0, 0.0, 0.0]
    assert not any(d.estimated for d in exact) and all(d.estimated for d in estimated)
    for e, x in zip(estimated[3:], exact[3:], strict=True):
        assert x.rel_diff > 0 and abs(e.rel_diff / x.rel_diff - 1) < 0.1, (e.rel_diff, x.rel_diff)
        assert e.max_abs is None and e.max_abs_at is None


def test_summaries_point_to_the_departing_position_and_non_finite_values():
    ref = _hidden(2)
    ours = ref.copy()
    ours[2, 77] += 0.5
    estimated = _estimate(ref, ours)
    assert estimated[2].departs_most_at == (0, 77) and estimated[1].rel_diff == 0.0
    ours[4, 9, 3] = np.nan
    bad = _estimate(ref, ours)[4]
    assert np.isnan(bad.rel_diff) and bad.max_abs_at == (0, 9, 0)


def _runs(perturb: dict | None = None, full: tuple[int, ...] = ()) -> tuple[ReferenceRun, JaxRun]:
    """A reference and a JAX run of two prompts, equal unless ``perturb`` = {"state", "prompt", "position",
    "size"}; the reference keeps the full hidden states of the prompts in ``full`` and summaries for all."""
    rng = np.random.default_rng(0)
    refs, ours, position_metrics = [], [], []
    for prompt in range(2):
        tokens = rng.integers(0, VOCAB, LENGTH).astype(np.int32)
        h = _hidden(10 + prompt)
        logits = rng.normal(size=(LENGTH, VOCAB)).astype(np.float32)
        experts = np.tile(np.arange(K, dtype=np.int32), (N_STATES - 1, LENGTH, 1))
        probs = np.tile(np.array([0.5, 0.3, 0.2], np.float32), (N_STATES - 1, LENGTH, 1))
        ref_ids = np.tile(np.arange(K + 1, dtype=np.int32), (N_STATES - 1, LENGTH, 1))
        jax_h = h.copy()
        if perturb is not None and perturb["prompt"] == prompt:
            jax_h[perturb["state"] :, perturb["position"]] += perturb["size"]
        view = metrics.logit_view(logits)
        ref = SequenceRecord(LENGTH - 2, tokens, tokens[-2:], h, experts, view, ref_ids, probs)
        refs.append(ref.summarised(keep_hidden=prompt in full))
        ours.append(SequenceRecord(LENGTH - 2, tokens, tokens[-2:], jax_h, experts))
        position_metrics.append(metrics.per_position_logit_metrics(view, logits))
    reference = ReferenceRun(
        prompts=tuple(Prompt(f"p{i}", "t", (1, 2, 3)) for i in range(2)),
        sequences=tuple(refs),
        manifest={"dtype": "float32"},
        calibration=None,
        determinism=(determinism.logits_check("reference", [(True, 0.0)]),),
    )
    return reference, JaxRun(tuple(ours), tuple(position_metrics), (None, None), (), None)


def _report(reference: ReferenceRun, jax_run: JaxRun) -> dict:
    report = synthetic_report(reference, jax_run, reference_source="bundle", hidden_states=0)
    validate_report(report)
    return report


def test_equal_runs_agree_on_summaries_alone():
    report = _report(*_runs())
    assert report["verdict"]["status"] == "agree", report["verdict"]
    assert all(layer["rel_diff"] == 0.0 and layer["estimated"] for layer in report["layers"])
    assert report["hidden_states"]["summaries_only"] == [0, 1] and report["hidden_states"]["diverging"] == []


def test_summaries_localise_the_first_diverging_layer_and_say_full_states_were_not_kept():
    report = _report(*_runs({"state": 3, "prompt": 1, "position": 40, "size": 1e-2}))
    verdict = report["verdict"]
    assert verdict["status"] == "diverge" and verdict["first_diverging_layer"] == 3
    assert [layer["exceeds"] for layer in report["layers"]] == [False, False, False, True, True]
    layer = report["layers"][3]
    assert layer["estimated"] and layer["max_abs"] is None and layer["max_abs_at"] is None
    assert layer["departs_most_at"] == {"prompt": 1, "position": 40}
    assert report["hidden_states"]["diverging_without_full"] == [1]
    assert any(
        "full hidden states were not kept for the diverging prompt(s) [1]" in w for w in report["warnings"]
    )
    assert "departing most at prompt 1 position 40; full hidden states not kept" in verdict["reasons"][0]
    assert "Full hidden states were not kept for the diverging prompt(s) 1" in render_html(report)
    assert (
        "first diverging hidden state 3 (layer 2 (linear_attention)): estimated rel_diff"
        in terminal_summary(report)
    )


def test_full_states_where_kept_give_the_exact_figures():
    """The diverging prompt's full states kept (as after a live recompute): max |diff| and its coordinate."""
    report = _report(*_runs({"state": 3, "prompt": 1, "position": 40, "size": 1e-2}, full=(1,)))
    layer = report["layers"][3]
    assert report["verdict"]["first_diverging_layer"] == 3 and report["hidden_states"]["full"] == [1]
    assert layer["max_abs_at"]["prompt"] == 1 and layer["max_abs_at"]["position"] == 40
    assert layer["max_abs"] == pytest.approx(1e-2, rel=1e-3)
    assert report["hidden_states"]["diverging_without_full"] == []


def test_a_diverging_prompt_needs_the_full_states_of_the_side_that_lacks_them():
    """A live run recomputes a diverging prompt's full states where either side holds only summaries (the JAX
    side keeps its own only where the reference does); not where both hold them, nor for an agreeing prompt."""
    from audit.compare import full_states_needed

    def jax_summaries_only(jax_run: JaxRun) -> JaxRun:
        return dataclasses.replace(
            jax_run, sequences=tuple(s.summarised(keep_hidden=False) for s in jax_run.sequences)
        )

    diverging = {"state": 3, "prompt": 1, "position": 40, "size": 1e-2}
    reference, jax_run = _runs(diverging, full=(1,))
    assert full_states_needed(reference, jax_run, "float32") == []
    assert full_states_needed(reference, jax_summaries_only(jax_run), "float32") == [1]
    reference, jax_run = _runs(diverging)
    assert full_states_needed(reference, jax_run, "float32") == [1]
    assert full_states_needed(*_runs(), "float32") == []


def test_recomputed_full_states_are_checked_against_the_summaries():
    """Recomputed full states are set where asked; a prompt whose recomputed states do not give its recorded
    summaries bitwise is named in a warning."""
    from audit.records import with_recomputed_hidden

    reference, _ = _runs()
    summarised = tuple(s.summarised(keep_hidden=False) for s in reference.sequences)
    states = {0: _hidden(10), 1: _hidden(11) + np.float32(1e-3)}  # _runs's states: prompt 1's moved
    sequences, warnings = with_recomputed_hidden(summarised, [0, 1], states.__getitem__, "JAX side")
    assert all(np.array_equal(s.hidden, states[i]) for i, s in enumerate(sequences))
    assert warnings == [
        "prompt 1: the JAX side's recomputed hidden states differ from those it summarised first"
    ]
    sequences, warnings = with_recomputed_hidden(summarised, [1], lambda i: _hidden(11), "reference")
    assert warnings == [] and sequences[0].hidden is None and sequences[1].hidden is not None


def test_a_prompt_is_diverging_only_where_the_run_diverges():
    """A prompt over a layer's tolerance on its own, in a run whose layers agree over all prompts, is not a
    divergence (no recompute, no warning); past the tolerance over all prompts, it is."""
    from audit.compare import diverging_prompts, hidden_terms, tolerances

    def one_prompt_over(factor: float) -> tuple[list[float], list[int]]:
        reference, jax_run = _runs()
        h = jax_run.sequences[1].hidden  # equal to the reference's
        tol = tolerances("float32", None, N_STATES)
        # a departure of prompt 1's last state sized to rel_diff = factor x the tolerance on that prompt alone
        size = np.sqrt(
            factor * tol.layers[-1] * 2 * float((h[-1].astype(np.float64) ** 2).sum()) / LENGTH / WIDTH
        )
        ours = jax_run.sequences[1]
        jax_h = ours.hidden.copy()
        jax_h[-1] += np.float32(size)
        sequences = (jax_run.sequences[0], dataclasses.replace(ours, hidden=jax_h))
        jax_run = dataclasses.replace(jax_run, sequences=sequences)
        alone = [float(t.rel_diff()[-1]) for t in hidden_terms(reference, jax_run)]
        return [a / tol.layers[-1] for a in alone], diverging_prompts(reference, jax_run, tol)

    ratios, diverging = one_prompt_over(1.5)
    assert ratios[0] == 0 and 1.2 < ratios[1] < 1.8 and diverging == []
    ratios, diverging = one_prompt_over(4.0)
    assert ratios[1] > 3 and diverging == [1]


def test_hidden_states_with_a_bundle_is_refused_in_one_line(tmp_path, capsys):
    bundle = save_bundle(_three_prompt_run(), tmp_path / "b")
    args = ["compare", "--reference", str(bundle), "--hidden-states", "1", "--report", str(tmp_path / "r")]
    assert cli.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drop --hidden-states" in err and str(bundle) in err, err


def _three_prompt_run() -> ReferenceRun:
    reference, _ = _runs()
    third = dataclasses.replace(reference.sequences[0], hidden=_hidden(7), norms=None, sketch=None)
    sequences = (
        *(
            dataclasses.replace(s, hidden=_hidden(i), norms=None, sketch=None)
            for i, s in enumerate(reference.sequences)
        ),
        third,
    )
    manifest = {"dtype": "float32", "max_new_tokens": 2, "hidden_summary": metrics.sketch_spec(WIDTH)}
    return ReferenceRun(
        prompts=(*reference.prompts, Prompt("p2", "t", (1, 2, 3))),
        sequences=sequences,
        manifest=manifest,
        calibration=None,
        determinism=reference.determinism,
    )


def test_bundle_keeps_summaries_for_all_and_full_states_for_the_first_n(tmp_path):
    run = _three_prompt_run()
    save_bundle(run, tmp_path / "b", hidden_states=1)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest["full_hidden_states"] == [0] and loaded.manifest["hidden_states"] == 1
    assert loaded.sequences[0].hidden is not None and loaded.sequences[1].hidden is None
    for before, after in zip(run.sequences, loaded.sequences, strict=True):
        norms, sketch = metrics.summarise_hidden(before.hidden)
        np.testing.assert_array_equal(after.norms, norms)
        np.testing.assert_array_equal(after.sketch, sketch)
        np.testing.assert_array_equal(after.generated, before.generated)
        np.testing.assert_array_equal(after.experts, before.experts)
        np.testing.assert_array_equal(after.router_ids, before.router_ids)
        assert after.router_ids.dtype == np.int32
        np.testing.assert_array_equal(after.logits.values, before.logits.values)
    np.testing.assert_array_equal(loaded.sequences[0].hidden, run.sequences[0].hidden)


def _edit_manifest(bundle: Path, **changes) -> Path:
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | changes))
    return bundle


def test_an_old_format_bundle_is_refused_in_one_line(tmp_path, capsys):
    bundle = _edit_manifest(save_bundle(_three_prompt_run(), tmp_path / "old"), bundle_format=1)
    args = ["compare", "--reference", str(bundle), "--checkpoint", str(tmp_path / "unused"), "--no-progress"]
    assert cli.main([*args, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{bundle / 'manifest.json'}: bundle format 1" in err and f"reads format {BUNDLE_FORMAT}" in err
    assert not (tmp_path / "r").exists()


def test_sketches_of_another_projection_are_refused(tmp_path):
    run = _three_prompt_run()
    spec = metrics.sketch_spec(WIDTH) | {"seed": metrics.SKETCH_SEED + 1}
    bundle = _edit_manifest(save_bundle(run, tmp_path / "b"), hidden_summary=spec)
    with pytest.raises(AuditInputError, match="made with another projection"):
        load_bundle(bundle)


def test_readme_states_the_full_size_bytes_per_position():
    """The figure in the README is the formula's, from the project's copy of the real config."""
    size = full_size_bytes_per_token()
    assert size["total"] < size["full_hidden_states"] / 50
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{size['total']:,} bytes per position" in readme
    assert f"{size['full_hidden_states']:,}" in readme


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from audit import demo

    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


def _assert_meets_the_formula(bundle: Path, checkpoint: Path, full: list[int]) -> dict:
    """Every array a bundle keeps for all prompts takes exactly the formula's bytes per position; the full hidden
    states only the kept prompts'; the file holds little else."""
    from qwen_jax.config import ModelConfig

    cfg = ModelConfig.from_json(checkpoint / "config.json")
    size = bundle_size(bundle)
    assert size["per_position"] == bundle_bytes_per_token(cfg)
    assert size["full_hidden_states"] == full
    positions = {i: len(s.tokens) for i, s in enumerate(load_bundle(bundle).sequences)}
    assert size["hidden_bytes"] == sum(positions[i] for i in full) * full_hidden_bytes_per_token(cfg)
    arrays_bytes = (bundle / "arrays.npz").stat().st_size
    formula = size["positions"] * sum(bundle_bytes_per_token(cfg).values()) + size["hidden_bytes"]
    assert formula <= arrays_bytes <= formula + 512 * 10 * len(positions)  # npy headers and zip entries
    return size


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: on a loaded 2-core machine its default threads measured 100x
    slower (a 3-token greedy of the demo: 7 s against 0.09 s)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_demo_bundle_meets_the_formula(demo_dir, tmp_path, one_torch_thread):
    """In process, on the demo model (float32: no calibration), two prompts, the first keeping its full states."""
    from audit import demo
    from audit.prompts import PromptSpec, load_checkpoint_tokenizer, render_all
    from audit.reference import record_reference

    specs = [PromptSpec(p["name"], messages=tuple(p["messages"])) for p in demo.DEMO_PROMPTS[:2]]
    prompts = render_all(specs, load_checkpoint_tokenizer(demo_dir))
    run = record_reference(
        demo_dir,
        prompts,
        dtype="float32",
        max_new_tokens=4,
        seed=0,
        stop_token_ids=(1,),
        manifest={},
        progress=False,
        hidden_states=1,
    )
    assert run.sequences[0].hidden is not None and run.sequences[1].hidden is None
    _assert_meets_the_formula(save_bundle(run, tmp_path / "b", hidden_states=1), demo_dir, [0])


@pytest.mark.slow
def test_record_of_the_demo_meets_the_formula(tmp_path):
    """`python -m audit record` of the built-in demo (its checkpoint and prompts, bf16 with calibration, default
    --hidden-states), as the README measures it."""
    pytest.importorskip("torch")
    from audit import demo

    bundle = tmp_path / "bundle"
    result = subprocess.run(
        [sys.executable, "-m", "audit", "record", "--out", str(bundle), "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "QWEN_JAX_AUDIT_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    size = _assert_meets_the_formula(bundle, tmp_path / "cache" / demo.demo_checkpoint_dir().name, [0, 1])
    assert f"{size['per_token_bytes_per_position']:,.0f} bytes per position" in result.stdout


@pytest.mark.slow
def test_a_divergence_is_localised_with_and_without_full_states(demo_dir, tmp_path):
    """One expert of layer 5 altered on the JAX side, --hidden-states 0: from a bundle (no full states) the
    summaries localise layer 5 and the report says the full states were not kept; with a live reference the
    diverging prompts' full states are recomputed and give max |diff| at that layer."""
    pytest.importorskip("torch")
    from mera_fixtures import FIXTURES
    from safetensors.numpy import load_file, save_file

    altered = tmp_path / "altered"
    shutil.copytree(demo_dir, altered)
    tensors = load_file(altered / "model.safetensors")
    tensors["model.layers.5.mlp.experts.down_proj"] *= 10.0  # every expert of layer 5
    save_file(tensors, altered / "model.safetensors", metadata={"format": "pt"})
    samples = sorted(FIXTURES.glob("samples_med_bench_*.jsonl"))[0]
    common = ["--samples", str(samples), "--limit", "2", "--max-new-tokens", "4", "--no-progress"]

    def audit(*args):
        return subprocess.run(
            [sys.executable, "-m", "audit", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )

    bundle = tmp_path / "bundle"
    recorded = audit(
        "record", "--checkpoint", str(demo_dir), *common, "--hidden-states", "0", "--out", str(bundle)
    )
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert bundle_size(bundle)["full_hidden_states"] == []
    reports = {}
    for source, args in {
        "bundle": ["--reference", str(bundle), "--no-progress"],
        "live": [*common, "--hidden-states", "0"],
    }.items():
        out = tmp_path / source
        result = audit(
            "compare",
            "--checkpoint",
            str(demo_dir),
            "--jax-checkpoint",
            str(altered),
            *args,
            "--report",
            str(out),
        )
        assert result.returncode == 1, result.stdout + result.stderr
        reports[source] = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert reports[source]["verdict"]["first_diverging_layer"] == 6, reports[source]["verdict"]
    bundle_layer, live_layer = reports["bundle"]["layers"][6], reports["live"]["layers"][6]
    assert bundle_layer["estimated"] and bundle_layer["max_abs"] is None
    assert reports["bundle"]["hidden_states"]["diverging_without_full"] == [0, 1]
    assert any("full hidden states were not kept" in w for w in reports["bundle"]["warnings"])
    assert not live_layer["estimated"] and live_layer["max_abs"] > 0
    assert reports["live"]["hidden_states"]["full"] == [0, 1]
    assert reports["live"]["hidden_states"]["diverging_without_full"] == []
    assert bundle_layer["rel_diff"] == pytest.approx(live_layer["rel_diff"], rel=0.15)
