"""audit/report.py: report.json against its schema, the self-contained report.html, atomic writes, the summary.

The reports are synthetic but shaped like `python -m audit compare`'s: an agreeing bf16 run, a diverging run with
a replay and greedy divergences (and hostile text, nulls and exact zeros), and a minimal degenerate one.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import tomllib
import warnings
from importlib import resources
from pathlib import Path

import pytest

from audit import report as report_mod
from audit.report import ReportPaths, render_html, terminal_summary, validate_report, write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'
N_LAYERS = 8  # decoder layers; hidden states 0..N_LAYERS+1


def _stats(mean, p99, mx):
    return {"mean": mean, "p99": p99, "max": mx}


def _layer_name(i: int) -> str:
    if i == 0:
        return "embeddings"
    if i == N_LAYERS + 1:
        return "final norm"
    kind = "full_attention" if i % 4 == 0 else "linear_attention"
    return f"layer {i - 1} ({kind})"


def agreeing_report() -> dict:
    rng = random.Random(0)
    tol = [0.0] + [2e-4 * (1 + 0.3 * i) for i in range(1, N_LAYERS + 2)]
    layers = []
    for i in range(N_LAYERS + 2):
        rel = 0.0 if i < 3 else tol[i] * rng.uniform(0.05, 0.5)  # the first layers bitwise equal in bf16
        routing = None
        if 1 <= i <= N_LAYERS:
            flips = 0 if i < 3 else rng.randint(0, 2)
            routing = {
                "tokens": 96,
                "set_equal_rate": 1 - flips / 96,
                "flips": flips,
                "flips_at_near_tie": flips,
                "min_margin": rng.uniform(1e-4, 1e-2),
            }
        layers.append(
            {
                "index": i,
                "name": _layer_name(i),
                "rel_diff": rel,
                "max_abs": 0.0 if rel == 0 else rel * 40,
                "max_abs_at": {"prompt": i % 2, "position": 3 * i, "dim": 17 * i},
                "tolerance": tol[i],
                "exceeds": False,
                "routing": routing,
            }
        )
    prompts = [
        {
            "index": 0,
            "name": "med_bench doc 3",
            "text": "Вопрос: какой витамин...\nA. C\nB. D",
            "prompt_tokens": 40,
            "positions": 56,
        },
        {"index": 1, "name": "greeting", "text": "Hello, world!", "prompt_tokens": 24, "positions": 40},
    ]
    per_position = []
    for p in prompts:
        n = p["positions"]
        per_position.append(
            {
                "prompt": p["index"],
                "kl": [rng.lognormvariate(math.log(2e-5), 1.0) for _ in range(n)],
                "max_abs": [rng.uniform(0.01, 0.1) for _ in range(n)],
                "top1_agree": [True] * n,
                "ref_margin": [rng.uniform(0.1, 8) for _ in range(n)],
            }
        )
    greedy = []
    for p in prompts:
        toks = [rng.randint(0, 248000) for _ in range(p["positions"] - p["prompt_tokens"] + 1)]
        text = "Ответ: B" if p["index"] == 0 else "Hi! How can I help?"
        greedy.append(
            {
                "prompt": p["index"],
                "reference_tokens": toks,
                "jax_tokens": list(toks),
                "reference_text": text,
                "jax_text": text,
                "first_divergence": None,
                "divergence": None,
            }
        )
    return {
        "schema_version": 1,
        "tool": {"name": "qwen-jax-audit", "version": "0.1.0"},
        "created": "2026-11-30T01:02:03Z",
        "claim": "JAX vs PyTorch reference agreement on the given checkpoint and prompts",
        "verdict": {"status": "agree", "exit_code": 0, "reasons": [], "first_diverging_layer": None},
        "settings": {
            "dtype": "bfloat16",
            "seed": 1234,
            "max_new_tokens": 17,
            "checkpoint": "/ckpt/qwen3.6-35b-a3b",
            "jax_checkpoint": None,
            "prompts_source": "prompts.jsonl",
            "reference_source": "live",
            "reasoning_split": None,
        },
        "manifest": {
            "reference": {
                "torch": "2.13.0",
                "transformers": "5.24.0",
                "safetensors_sha256": {"model.safetensors": "ab" * 32},
            },
            "jax": {
                "jax": "0.10.2",
                "xla_flags": ["--xla_allow_excess_precision=false"],
                "safetensors_sha256": {"model.safetensors": "ab" * 32},
            },
            "differences": [],
        },
        "tolerances": {
            "source": "calibrated",
            "description": "4x the bf16-vs-fp32 spread of the reference on the tiny checkpoint",
            "logits": {"mean_kl": 5e-4, "p99_max_abs": 0.25},
            "layers": tol,
        },
        "calibration": {
            "description": "reference bf16 vs reference fp32, tiny checkpoint, 8 prompts",
            "logits": {"kl": _stats(1.2e-4, 9e-4, 2e-3), "max_abs": _stats(0.02, 0.06, 0.09)},
            "layers": [t / 4 for t in tol],
        },
        "prompts": prompts,
        "logits": {
            "summary": {
                "max_abs": _stats(0.05, 0.098, 0.1),
                "mean_abs": _stats(0.004, 0.007, 0.008),
                "rel_diff": _stats(1e-5, 3e-5, 4e-5),
                "kl": _stats(3e-5, 2e-4, 5e-4),
                "top1_agree": _stats(1.0, 1.0, 1.0),
                "top5_overlap": _stats(0.995, 1.0, 1.0),
                "ref_margin": _stats(3.2, 7.8, 8.0),
                "top20_overlap": _stats(0.99, 1.0, 1.0),
            },
            "per_position": per_position,
        },
        "layers": layers,
        "greedy": {"exact_match_rate": 1.0, "prompts": greedy},
        "determinism": [
            {
                "name": "jax run-to-run",
                "kind": "bitwise",
                "passed": True,
                "max_abs": 0.0,
                "detail": "2 runs, identical logits",
            },
            {
                "name": "jax bs=1 vs bs=4",
                "kind": "tolerance",
                "passed": True,
                "max_abs": 3e-3,
                "detail": "within 1e-2",
            },
        ],
        "replay": None,
        "warnings": [],
    }


def diverging_report() -> dict:
    r = agreeing_report()
    r["verdict"] = {
        "status": "diverge",
        "exit_code": 1,
        "reasons": [
            "hidden state 5 rel_diff 0.031 > tolerance 0.0005",
            "greedy: 1 divergence classified as a bug",
        ],
        "first_diverging_layer": 5,
    }
    r["manifest"]["differences"] = [{"key": "transformers", "reference": "5.24.0", "jax": None}]
    r["manifest"]["jax"]["transformers"] = None
    r["manifest"]["reference"]["note"] = HOSTILE
    r["tolerances"]["source"] = "fixed"
    r["calibration"] = None
    r["settings"]["reasoning_split"] = "qwen3"
    r["settings"]["reference_source"] = "bundle"
    for layer in r["layers"]:
        if layer["index"] >= 5:
            layer["rel_diff"] = 0.031 * (1 + layer["index"] - 5)
            layer["exceeds"] = True
    r["layers"][7]["rel_diff"] = None  # not computed
    r["layers"][7]["max_abs"] = None
    r["layers"][6]["routing"]["flips"] = 9
    r["prompts"].append(
        {
            "index": 2,
            "name": HOSTILE,
            "text": HOSTILE + "\n" + "очень длинный текст " * 400,
            "prompt_tokens": 30,
            "positions": 46,
        }
    )
    rng = random.Random(1)
    kl = [rng.lognormvariate(math.log(1e-3), 1.5) for _ in range(46)]
    kl[3], kl[10], kl[20] = None, 0.0, None
    r["logits"]["per_position"].append(
        {
            "prompt": 2,
            "kl": kl,
            "max_abs": [0.3] * 46,
            "top1_agree": [True] * 40 + [False] * 6,
            "ref_margin": [None] * 46,
        }
    )
    r["logits"]["summary"]["kl"] = _stats(0.02, 0.4, None)
    r["logits"]["summary"]["top1_agree"] = _stats(0.96, 1.0, 1.0)
    g0 = r["greedy"]["prompts"][0]
    g0["jax_tokens"][2] += 1
    g0["jax_text"] = "Ответ: C"
    g0["first_divergence"] = 2
    g0["divergence"] = {
        "position": 2,
        "reference_token": g0["reference_tokens"][2],
        "jax_token": g0["jax_tokens"][2],
        "jax_token_in_reference_top5": True,
        "reference_token_in_jax_top5": True,
        "reference_logprob_gap": 0.004,
        "jax_logprob_gap": 0.003,
        "classification": "near-tie",
    }
    toks = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    r["greedy"]["prompts"].append(
        {
            "prompt": 2,
            "reference_tokens": toks,
            "jax_tokens": toks[:5] + [99] * 12,
            "reference_text": "Сначала подумаем. " + HOSTILE,
            "jax_text": "Сначала подумаем. !!!!!!!!!!\x1b[31m\x00",
            "first_divergence": 5,
            "divergence": {
                "position": 5,
                "reference_token": 12,
                "jax_token": 99,
                "jax_token_in_reference_top5": False,
                "reference_token_in_jax_top5": False,
                "reference_logprob_gap": None,
                "jax_logprob_gap": 7.5,
                "classification": "bug",
            },
        }
    )
    r["greedy"]["exact_match_rate"] = 1 / 3
    r["determinism"].append(
        {
            "name": "reference run-to-run",
            "kind": "bitwise",
            "passed": False,
            "max_abs": None,
            "detail": HOSTILE,
        }
    )

    def item(task, doc, logged, replayed, gold, quirk=None, hash_ok=True, truncated=False):
        em_l = float(logged == gold)
        em_r = float(replayed == gold)
        return {
            "task": task,
            "doc_id": doc,
            "meta_id": doc + 100 if doc % 2 == 0 else None,
            "prompt_hash_ok": hash_ok,
            "prompt_tokens": 180 + doc,
            "logged": logged,
            "replayed": replayed,
            "replayed_raw": "<think>\nДумаю... " + HOSTILE + "\n</think>\n\n" + replayed
            if replayed
            else "<think>" + "x" * 5000,
            "equal": logged == replayed,
            "gold": gold,
            "logged_em": em_l,
            "logged_f1": em_l,
            "replayed_em": em_r,
            "replayed_f1": em_r,
            "quirk": quirk,
            "truncated_by_cap": truncated,
        }

    items = [
        item("med_bench", 0, "B", "B", "B"),
        item("med_bench", 1, "A", "C", "A"),
        item(
            "med_bench",
            2,
            "",
            "",
            "A",
            quirk="empty reply scores 1 on gold 'A' (SQuAD drops the article)",
            truncated=True,
        ),
        item("agro_bench", 0, "A,C", "A, C", "A,C"),
        item("agro_bench", 1, HOSTILE, HOSTILE, "D", hash_ok=False),
    ]
    r["replay"] = {
        "reasoning_split": "qwen3",
        "enable_thinking": True,
        "max_new_tokens_cap": 256,
        "tasks": [
            {
                "task": "med_bench",
                "source": "samples_med_bench_2026-05-01T10-15-30.123456.jsonl",
                "items": 3,
                "answer_agreement": 2 / 3,
                "logged_em": 2 / 3,
                "logged_f1": 2 / 3,
                "replayed_em": 1 / 3,
                "replayed_f1": 1 / 3,
                "quirk_items": 1,
                "prompt_hash_mismatches": 0,
                "truncated_by_cap": 1,
            },
            {
                "task": "agro_bench",
                "source": "samples_agro_bench_2026-05-01T11-20-45.654321.jsonl",
                "items": 2,
                "answer_agreement": 0.5,
                "logged_em": 0.5,
                "logged_f1": None,
                "replayed_em": 0.0,
                "replayed_f1": None,
                "quirk_items": 0,
                "prompt_hash_mismatches": 1,
                "truncated_by_cap": 0,
            },
        ],
        "items": items,
        "submission": {
            "path": "logs_public.zip",
            "output_mismatches": ["med_bench doc 1: outputs 'A' vs logged 'C'"],
        },
        "warnings": ["1 item truncated at the 256-token cap: its answer is not comparable"],
    }
    r["warnings"] = ["manifest: transformers differs", HOSTILE]
    return r


def minimal_report() -> dict:
    r = agreeing_report()
    r["verdict"] = {
        "status": "diverge",
        "exit_code": 1,
        "reasons": ["no prompts were compared"],
        "first_diverging_layer": None,
    }
    r["manifest"] = {"reference": {}, "jax": {}, "differences": []}
    r["tolerances"] = {
        "source": "fixed",
        "description": "",
        "logits": {"mean_kl": None, "p99_max_abs": None},
        "layers": [],
    }
    r["calibration"] = None
    r["prompts"] = []
    r["logits"] = {
        "summary": {m: _stats(None, None, None) for m in report_mod.LOGIT_METRICS},
        "per_position": [],
    }
    r["layers"] = []
    r["greedy"] = {"exact_match_rate": None, "prompts": []}
    r["determinism"] = []
    return r


REPORTS = {"agreeing": agreeing_report, "diverging": diverging_report, "minimal": minimal_report}


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {name: render_html(build()) for name, build in REPORTS.items()}


@pytest.mark.parametrize("name", REPORTS)
def test_reports_validate_and_round_trip(name):
    r = REPORTS[name]()
    validate_report(r)
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def _set(r, path, value):
    *head, last = path
    for p in head:
        r = r[p]
    r[last] = value


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("greedy", "prompts", 0, "divergence", "position"), "2", "$.greedy.prompts[0].divergence"),
        (("verdict", "exit_code"), 0, "$.verdict.exit_code"),  # diverge must exit 1
        (("layers", 2, "routing", "flips"), -1, "$.layers[2].routing"),
        (("replay", "items", 1, "doc_id"), None, "$.replay"),
        (("settings", "dtype"), "float16", "$.settings.dtype"),
        (("logits", "per_position", 0, "kl", 3), float("nan"), "$.logits.per_position[0].kl[3]"),
        (("logits", "summary", "kl", "max"), float("inf"), "$.logits.summary.kl.max"),
        (("created",), "yesterday", "$.created"),
        (("warning",), [], "'warning'"),  # a typo at the top level
    ],
)
def test_invalid_report_fails_naming_the_path(path, value, expected):
    r = diverging_report()
    _set(r, path, value)
    with pytest.raises(ValueError, match=re.escape(expected)):
        validate_report(r)


def test_missing_key_names_its_object():
    r = diverging_report()
    del r["layers"][2]["routing"]
    with pytest.raises(ValueError, match=r"\$\.layers\[2\]: 'routing' is a required property"):
        validate_report(r)


def test_schema_and_template_are_package_data():
    files = resources.files("audit")
    assert files.joinpath("report.schema.json").is_file()
    assert files.joinpath("templates/report.html.jinja").is_file()
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "audit"
    ]
    assert "report.schema.json" in globs and "templates/*.jinja" in globs


@pytest.mark.parametrize("name", REPORTS)
def test_html_is_self_contained(rendered, name):
    html = rendered[name]
    assert html.startswith("<!DOCTYPE html>")
    # no external resource of any kind: every src/href is a fragment or a data: URI
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, flags=re.I)
    assert refs and all(ref.startswith(("#", "data:")) for ref in refs), refs
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower()
    assert "@import" not in html and "url(" not in html
    n_plots = html.count('src="data:image/png;base64,')
    assert n_plots == {"agreeing": 2, "diverging": 2, "minimal": 0}[name]


def test_text_is_escaped(rendered):
    html = rendered["diverging"]
    assert "<script>alert" not in html and "<b>bold</b>" not in html
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
    # prompt name and text, manifest value, greedy text, determinism detail, item answer and raw reply, warning
    assert html.count(escaped) >= 8


def test_html_shows_the_findings(rendered):
    html = rendered["diverging"]
    assert re.search(r'id="verdict" class="banner diverge">\s*<div><span class="status">DIVERGE</span>', html)
    assert "first diverging hidden state: <b>5</b> (layer 4 (linear_attention))" in html
    assert "JAX vs PyTorch reference agreement on the given checkpoint and prompts" in html
    # greedy text: common prefix plain, then each side's rest highlighted
    assert (
        'Ответ: <span class="rest-ref">B</span>' in html and 'Ответ: <span class="rest-jax">C</span>' in html
    )
    assert '7 8 9 10 11 <span class="rest-jax">99 99' in html  # token level
    assert (
        html.count('<tr class="bad"><td class="mono">transformers</td>') == 2
    )  # differences + full manifest
    assert "empty reply scores 1 on gold" in html and "MISMATCH" in html
    assert "more characters in report.json" in html  # long texts clipped in the HTML only
    assert "top20_overlap" in html  # extra metrics are shown
    assert "!!!!!!!!!!␛[31m␀</span>" in html and "\x1b" not in html  # control characters made visible
    assert (
        '<td class="mono"><span class="muted">(absent)</span></td>' in html
    )  # one side only: not a difference
    assert "built-in method" not in html  # a key shadowed by a dict method in the template (t.items)
    assert '<td class="num">3</td><td class="num">66.67%</td>' in html
    assert "No replay in this run." in rendered["agreeing"] and "AGREE" in rendered["agreeing"]
    assert (
        "No hidden states compared." in rendered["minimal"] and "No per-position data." in rendered["minimal"]
    )


def test_write_report(tmp_path):
    r = diverging_report()
    paths = write_report(r, tmp_path / "new" / "dir")
    assert paths == ReportPaths(json=tmp_path / "new/dir/report.json", html=tmp_path / "new/dir/report.html")
    assert sorted(p.name for p in paths.json.parent.iterdir()) == ["report.html", "report.json"]
    assert json.loads(paths.json.read_text(encoding="utf-8")) == r
    assert paths.html.read_text(encoding="utf-8") == render_html(r)


def test_invalid_report_writes_nothing(tmp_path):
    r = minimal_report()
    r["greedy"]["exact_match_rate"] = "1"
    with pytest.raises(ValueError, match=r"\$\.greedy\.exact_match_rate"):
        write_report(r, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failing_write_is_atomic(tmp_path, monkeypatch):
    real_replace = report_mod.os.replace

    def replace(src, dst):
        if Path(dst).name == "report.html":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(report_mod.os, "replace", replace)
    # a fresh directory: no report.html and no temporary file afterwards
    with pytest.raises(OSError, match="disk full"):
        write_report(agreeing_report(), tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["report.json"]
    # an earlier report.html is left whole
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.html").write_text("previous report")
    with pytest.raises(OSError, match="disk full"):
        write_report(agreeing_report(), old)
    assert (old / "report.html").read_text() == "previous report"
    assert sorted(p.name for p in old.iterdir()) == ["report.html", "report.json"]


@pytest.mark.parametrize("name", REPORTS)
def test_terminal_summary(name):
    text = terminal_summary(REPORTS[name]())
    lines = text.splitlines()
    assert len(lines) <= 40 and all(len(line) <= 200 for line in lines)
    assert lines[0] == {"agreeing": "VERDICT: AGREE (exit code 0)"}.get(
        name, "VERDICT: DIVERGE (exit code 1)"
    )
    if name == "diverging":
        for needle in (
            "first diverging hidden state 5 (layer 4 (linear_attention)): rel_diff 0.031 > tolerance 0.0005",
            "greedy: exact match 1/3 (33.33%)",
            "prompt 2: token 5: ref 12 vs jax 99, bug",
            "determinism: 2/3 checks passed",
            "med_bench: answers agree 66.67% of 3",
            "warnings: 3",
            "KL(ref||jax)   0.02 / 0.4 / n/a",
        ):
            assert needle in text, needle


def test_many_warnings_keep_the_summary_short():
    r = diverging_report()
    r["claim"] = "A long claim. " * 40
    r["warnings"] = [f"warning {i}" for i in range(100)]
    r["verdict"]["reasons"] = [f"reason {i}" for i in range(100)]
    assert len(terminal_summary(r).splitlines()) <= 40


def test_divergence_position_convention():
    # generated token j is predicted by the logits at teacher-forced position prompt_tokens - 1 + j
    assert report_mod.divergence_x({"prompt_tokens": 40}, 2) == 41
    assert report_mod.divergence_x(None, 2) is None


def _chromium(url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
    ]
    return subprocess.run(
        [str(CHROMIUM), *flags, url], capture_output=True, text=True, timeout=120, check=False
    )


def _console_lines(stderr: str) -> list[str]:
    # headless Chromium logs every console message (error or not) as INFO:CONSOLE; the report has no script,
    # so any such line is a problem; so is a failed load
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "net::ERR" in line]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian: apt-get install -y chromium)"
)
def test_report_loads_in_headless_chromium(tmp_path):
    # the detector sees console errors: a control page that logs one
    control = tmp_path / "control.html"
    control.write_text(
        '<!DOCTYPE html><html><body><script>console.error("control-error")</script></body></html>'
    )
    out = _chromium(control.as_uri(), tmp_path)
    assert any("control-error" in line for line in _console_lines(out.stderr)), out.stderr[-2000:]

    paths = write_report(diverging_report(), tmp_path / "report")
    out = _chromium(paths.html.as_uri(), tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _console_lines(out.stderr) == []
    assert re.search(
        r'id="verdict" class="banner diverge">\s*<div><span class="status">DIVERGE</span>', out.stdout
    )
    assert out.stdout.count("data:image/png;base64,") == 2


def test_reports_are_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Reports" in readme and "--screenshot" in readme


def _null_numbers(obj):
    """Every float in the report made null, as a run that computed nothing would write it."""
    if isinstance(obj, dict):
        return {k: _null_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_null_numbers(v) for v in obj]
    return None if isinstance(obj, float) else obj


def test_all_null_numbers_render_without_warnings():
    r = _null_numbers(diverging_report())
    validate_report(r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        html = render_html(r)
        terminal_summary(r)
    assert html.count("data:image/png;base64,") == 2 and "n/a" in html
