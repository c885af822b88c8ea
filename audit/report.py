"""The report of ``python -m audit compare``: ``report.json``, ``report.html`` and a terminal summary.

The report is one dict (the layout is ``audit/report.schema.json``, schema version 1). This module does not
compute anything: it validates, writes and presents what the compare code measured.

- :func:`validate_report` checks it against the schema and rejects NaN/inf (JSON has none: write ``null``);
  a failure is a :class:`ValueError` naming the path, e.g. ``$.greedy.prompts[0].divergence.position``.
- :func:`render_html` gives ONE self-contained HTML file: inline CSS, plots as inline base64 PNGs drawn with
  matplotlib's Agg canvas, no script, no external URL; every text is escaped by jinja2's autoescape.
- :func:`write_report` validates, renders both files in memory, then writes each atomically (a temporary file
  in the same directory, fsync, ``os.replace``): a failure leaves the previous files, or none, and no
  temporary file.
- :func:`terminal_summary` is a short plain-text summary, verdict first.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
import secrets
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "ReportPaths",
    "render_html",
    "terminal_summary",
    "validate_report",
    "write_report",
]

SCHEMA_VERSION = 1
LOGIT_METRICS = ("max_abs", "mean_abs", "rel_diff", "kl", "top1_agree", "top5_overlap", "ref_margin")
# Characters of free text (prompts, raw replies) shown in the HTML; report.json keeps everything.
TEXT_CLIP = 4000


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    html: Path


# --------------------------------------------------------------------------------------------- validation


@functools.cache
def load_schema() -> dict:
    return json.loads(resources.files("audit").joinpath("report.schema.json").read_text(encoding="utf-8"))


def _path_str(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _non_finite(obj: Any, parts: tuple = ()) -> Iterable[tuple]:
    if isinstance(obj, float) and not math.isfinite(obj):
        yield parts
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _non_finite(v, (*parts, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _non_finite(v, (*parts, i))


def validate_report(report: dict) -> None:
    """Raise ValueError naming the first failing paths unless ``report`` matches report.schema.json."""
    import jsonschema

    bad = [_path_str(p) for p in _non_finite(report)]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"invalid report: non-finite number at {', '.join(bad[:5])}{more}; JSON has no NaN/inf, use null"
        )
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(
        validator.iter_errors(report), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if errors:
        lines = [f"{_path_str(e.absolute_path)}: {_short(e.message)}" for e in errors[:5]]
        more = f"\n  (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("invalid report (audit/report.schema.json) at " + "\n  ".join(lines) + more)


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ writing


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a new file next to ``path``, fsync it, then rename it over ``path``."""
    data = text.encode("utf-8")
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(report: dict, directory: Path) -> ReportPaths:
    """Validate ``report``, then write ``report.json`` and ``report.html`` into ``directory`` atomically."""
    validate_report(report)
    json_text = json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False) + "\n"
    html_text = render_html(report)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(json=directory / "report.json", html=directory / "report.html")
    _atomic_write(paths.json, json_text)
    _atomic_write(paths.html, html_text)
    return paths


# ------------------------------------------------------------------------------------------ formatting


def fmt(x: Any) -> str:
    """A number for a table: None as n/a, 4 significant digits."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return "0" if x == 0 else f"{x:.4g}"
    return str(x)


def pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    v = 100.0 * x
    if v != 100.0 and v > 99.99:  # never show a near-miss as 100%
        return f"{v:.4f}%"
    return f"{v:.2f}%".replace(".00%", "%")


_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Control characters (other than newline and tab) made visible: C0 as ␀..␟, DEL as ␡, C1 as \\x85."""

    def one(m: re.Match) -> str:
        c = ord(m.group())
        if c < 0x20:
            return chr(0x2400 + c)
        return "\u2421" if c == 0x7F else f"\\x{c:02x}"

    return _INVISIBLE.sub(one, text)


def _jsonish(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "(root)": obj}


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _clip(text: str, limit: int = TEXT_CLIP) -> tuple[str, int]:
    return (text, 0) if len(text) <= limit else (text[:limit], len(text) - limit)


# --------------------------------------------------------------------------------------------- plots


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _log_floor(values: Iterable[float]) -> float:
    pos = [v for v in values if math.isfinite(v) and v > 0]
    return min(pos) / 10.0 if pos else 1e-12


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_on_log(
    ax, xs: Sequence[float], ys: Sequence[float], floor: float, zero_label: str | None = None, **kw
):
    """Plot positive values on a log axis (the line breaks at nulls); exact zeros as hollow markers at ``floor``."""
    shown = [y if math.isfinite(y) and y > 0 else float("nan") for y in ys]
    line = ax.plot(xs, shown, **kw)[0]
    zeros = [x for x, y in zip(xs, ys, strict=True) if math.isfinite(y) and y <= 0]
    if zeros:
        ax.plot(
            zeros,
            [floor] * len(zeros),
            linestyle="none",
            marker="o",
            mfc="none",
            color=line.get_color(),
            markersize=5,
            label=zero_label,
        )
    return line


def layer_plot(report: Mapping) -> str | None:
    """rel_diff per hidden-state index (log y) with the tolerance and the first diverging layer; routing below."""
    layers = report["layers"]
    if not layers:
        return None
    from matplotlib.figure import Figure

    xs = [layer["index"] for layer in layers]
    rel = [_num(layer["rel_diff"]) for layer in layers]
    tol = [_num(layer["tolerance"]) for layer in layers]
    routed = [layer for layer in layers if layer["routing"] is not None]
    fig = Figure(figsize=(10, 5.4 if routed else 3.8))
    if routed:
        ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    else:
        ax, ax2 = fig.subplots(1, 1), None
    floor = _log_floor(rel + tol)
    ax.set_yscale("log")
    _plot_on_log(
        ax,
        xs,
        rel,
        floor,
        zero_label=f"exactly 0 (drawn at {floor:.0e})",
        marker="o",
        markersize=4,
        label="rel_diff (estimated from summaries)"
        if any(la.get("estimated") for la in layers)
        else "rel_diff",
    )
    if any(math.isfinite(t) and t > 0 for t in tol):
        tx = [x for x, t in zip(xs, tol, strict=True) if math.isfinite(t) and t > 0]
        ty = [t for t in tol if math.isfinite(t) and t > 0]
        ax.step(tx, ty, where="mid", color="C1", linestyle="--", label="tolerance")
    bad = [
        (x, r) for x, r, layer in zip(xs, rel, layers, strict=True) if layer["exceeds"] and math.isfinite(r)
    ]
    if bad:
        ax.plot(
            [b[0] for b in bad],
            [max(b[1], floor) for b in bad],
            linestyle="none",
            marker="x",
            color="C3",
            markersize=8,
            label="exceeds",
        )
    first = report["verdict"]["first_diverging_layer"]
    if first is not None:
        for a in (ax, ax2):
            if a is not None:
                a.axvline(first, color="C3", linestyle=":", linewidth=1.5)
        ax.annotate(
            f"first diverging: {first}",
            xy=(first, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            color="C3",
            fontsize=8,
        )
    ax.set_ylabel("rel_diff (log)")
    ax.set_title("Hidden states: JAX vs reference")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if ax2 is not None:
        rx = [layer["index"] for layer in routed]
        ry = [_num(layer["routing"]["set_equal_rate"]) for layer in routed]
        ax2.plot(rx, ry, marker="s", markersize=4, color="C2")
        ax2.set_ylim(min([0.9, *[y for y in ry if math.isfinite(y)]]) - 0.02, 1.01)
        ax2.set_ylabel("routing\nset-equal rate")
        ax2.grid(True, alpha=0.3)
        ax2.set_xlabel("hidden-state index (0 = embeddings)")
    else:
        ax.set_xlabel("hidden-state index (0 = embeddings)")
    return _png(fig)


def divergence_x(prompt: Mapping | None, position: int) -> int | None:
    """The teacher-forced position whose logits predict generated token ``position`` (None if unknown)."""
    if prompt is None:
        return None
    return prompt["prompt_tokens"] - 1 + position


def kl_plot(report: Mapping) -> str | None:
    """KL(ref || jax) per teacher-forced position, one line per prompt (log y), greedy divergences marked."""
    per_position = [p for p in report["logits"]["per_position"] if p["kl"]]
    if not per_position:
        return None
    from matplotlib.figure import Figure

    prompts = {p["index"]: p for p in report["prompts"]}
    divergences = {
        g["prompt"]: g["divergence"] for g in report["greedy"]["prompts"] if g["divergence"] is not None
    }
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots(1, 1)
    ax.set_yscale("log")
    all_kl = [_num(v) for p in per_position for v in p["kl"]]
    floor = _log_floor(all_kl)
    zeros_drawn = False
    for n, p in enumerate(per_position):
        kl = [_num(v) for v in p["kl"]]
        xs = list(range(len(kl)))
        color = f"C{n % 10}"
        prompt = prompts.get(p["prompt"])
        label = f"{p['prompt']}: {prompt['name']}" if prompt else str(p["prompt"])
        _plot_on_log(ax, xs, kl, floor, color=color, linewidth=1, label=label[:40] if n < 10 else None)
        if any(math.isfinite(v) and v <= 0 for v in kl):
            zeros_drawn = True
        start = prompt["prompt_tokens"] if prompt else None
        if start is not None and 0 < start < len(kl):
            ax.axvline(start - 0.5, color=color, linewidth=0.6, alpha=0.4)
        div = divergences.get(p["prompt"])
        if div is not None:
            x = divergence_x(prompt, div["position"])
            if x is not None and 0 <= x < len(kl):
                y = kl[x] if math.isfinite(kl[x]) and kl[x] > 0 else floor
                marker = "v" if div["classification"] == "near-tie" else "X"
                ax.plot([x], [y], marker=marker, color=color, markersize=10, mec="black", linestyle="none")
    note = f"; hollow circles: exactly 0 (drawn at {floor:.0e})" if zeros_drawn else ""
    ax.set_xlabel(f"teacher-forced position (faint line: end of prompt){note}")
    ax.set_ylabel("KL(ref || jax) (log)")
    ax.set_title("Per-position KL; greedy divergence: ▼ near-tie, ✖ bug", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=3,
        title=f"prompts (first 10 of {len(per_position)})" if len(per_position) > 10 else None,
        frameon=False,
    )
    return _png(fig)


# ---------------------------------------------------------------------------------------------- HTML


@functools.cache
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("audit", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["pct"] = pct
    env.filters["jsonish"] = _jsonish
    env.filters["visible"] = visible
    return env


def _manifest_rows(manifest: Mapping) -> list[dict]:
    ref, jax = _flatten(manifest["reference"]), _flatten(manifest["jax"])
    flagged = {d["key"] for d in manifest["differences"]}
    keys = list(ref) + [k for k in jax if k not in ref]
    rows = []
    for k in keys:
        both = k in ref and k in jax
        rows.append(
            {
                "key": k,
                "reference": _jsonish(ref[k]) if k in ref else None,
                "jax": _jsonish(jax[k]) if k in jax else None,
                "flagged": k in flagged,
                "differs": both and ref[k] != jax[k],
            }
        )
    return rows


def _split(a: str, n: int) -> dict:
    rest, omitted = _clip(a[n:])
    return {"common": a[:n], "rest": rest, "omitted": omitted}


def _greedy_rows(report: Mapping) -> list[dict]:
    prompts = {p["index"]: p for p in report["prompts"]}
    rows = []
    for g in report["greedy"]["prompts"]:
        rt, jt = g["reference_text"], g["jax_text"]
        nt = _common_prefix_len(rt, jt)
        ntok = _common_prefix_len(g["reference_tokens"], g["jax_tokens"])
        prompt = prompts.get(g["prompt"])
        rows.append(
            {
                "g": g,
                "name": prompt["name"] if prompt else "",
                "ref_text": _split(rt, nt),
                "jax_text": _split(jt, nt),
                "ref_tokens": {"common": g["reference_tokens"][:ntok], "rest": g["reference_tokens"][ntok:]},
                "jax_tokens": {"common": g["jax_tokens"][:ntok], "rest": g["jax_tokens"][ntok:]},
                "equal": g["reference_tokens"] == g["jax_tokens"],
                "text_equal": rt == jt,
            }
        )
    return rows


def _layer_name(report: Mapping, index: int | None) -> str | None:
    if index is None:
        return None
    for layer in report["layers"]:
        if layer["index"] == index:
            return layer["name"]
    return None


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (no script, no external resource)."""
    replay = report["replay"]
    replay_items = []
    if replay is not None:
        for item in replay["items"]:
            raw, omitted = _clip(item["replayed_raw"])
            replay_items.append({"item": item, "raw": raw, "raw_omitted": omitted})
    prompts = []
    for p in report["prompts"]:
        text, omitted = _clip(p["text"])
        prompts.append({"p": p, "text": text, "omitted": omitted})
    logit_metrics = list(LOGIT_METRICS) + [m for m in report["logits"]["summary"] if m not in LOGIT_METRICS]
    greedy = report["greedy"]["prompts"]
    context = {
        "r": report,
        "first_layer_name": _layer_name(report, report["verdict"]["first_diverging_layer"]),
        "manifest_rows": _manifest_rows(report["manifest"]),
        "layer_plot": layer_plot(report),
        "kl_plot": kl_plot(report),
        "logit_metrics": logit_metrics,
        "greedy_rows": _greedy_rows(report),
        "greedy_equal": sum(g["reference_tokens"] == g["jax_tokens"] for g in greedy),
        "prompts": prompts,
        "replay_items": replay_items,
        "replay_mismatches": sum(not i["item"]["equal"] for i in replay_items),
        "determinism_failed": sum(not d["passed"] for d in report["determinism"]),
        "text_clip": TEXT_CLIP,
    }
    return _environment().get_template("report.html.jinja").render(**context)


# ------------------------------------------------------------------------------------------ terminal


def _stats(s: Mapping | None) -> str:
    if s is None:
        return "n/a"
    return f"{fmt(s['mean'])} / {fmt(s['p99'])} / {fmt(s['max'])}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def _plain(text: str) -> str:
    """One terminal-safe line: control characters (newlines, ANSI escapes) become a space."""
    return _CONTROL.sub(" ", text)


def _listed(lines: list[str], items: Sequence[str], limit: int, indent: str = "  - ") -> None:
    for it in items[:limit]:
        lines.append(indent + _short(_plain(it), 150))
    if len(items) > limit:
        lines.append(f"{indent}... and {len(items) - limit} more (see report.html)")


def terminal_summary(report: dict) -> str:
    """A short plain-text summary: the verdict first, then the key numbers (at most about 40 lines)."""
    v, s = report["verdict"], report["settings"]
    sub_verdict = v.get("submission")
    if sub_verdict is None:
        lines = [f"VERDICT: {v['status'].upper()} (exit code {v['exit_code']})"]
    else:
        lines = [
            f"VERDICT: port {v['status'].upper()}, submission {sub_verdict['status'].upper().replace('_', ' ')} "
            f"(exit code {v['exit_code']}; failed: {', '.join(v['failed']) or 'none'})"
        ]
    _listed(lines, v["reasons"], 4)
    if sub_verdict is not None:
        lines.append(
            f"submission: {sub_verdict['reproduced_items']}/{sub_verdict['items']} items reproduced, "
            f"{sub_verdict['unreproduced_final_answers']} final answer(s) not reproduced"
        )
        _listed(lines, sub_verdict["reasons"], 10)
    claim = textwrap.wrap(_plain(report["claim"]), 110, initial_indent="claim: ", subsequent_indent="  ")
    lines += claim[:3] + (["  ..."] if len(claim) > 3 else [])
    diffs = report["manifest"]["differences"]
    lines.append(
        f"settings: {s['dtype']}, seed {s['seed']}, max_new_tokens {s['max_new_tokens']}, "
        f"reference {s['reference_source']}, {len(report['prompts'])} prompt(s); "
        f"manifest differences: {len(diffs)}"
        + (f" ({', '.join(d['key'] for d in diffs[:4])}{', ...' if len(diffs) > 4 else ''})" if diffs else "")
    )
    summary = report["logits"]["summary"]
    tol = report["tolerances"]["logits"]
    lines.append(f"logits (mean / p99 / max), tolerances {report['tolerances']['source']}:")
    lines.append(f"  KL(ref||jax)   {_stats(summary.get('kl'))}   (tolerance: mean {fmt(tol['mean_kl'])})")
    lines.append(
        f"  max |diff|     {_stats(summary.get('max_abs'))}   (tolerance: p99 {fmt(tol['p99_max_abs'])})"
    )
    lines.append(f"  top-1 agree    {_stats(summary.get('top1_agree'))}")
    lines.append(f"  top-5 overlap  {_stats(summary.get('top5_overlap'))}")
    first = v["first_diverging_layer"]
    if not report["layers"]:
        lines.append("layers: no hidden states compared")
    elif first is None:
        lines.append(f"layers: no hidden state exceeds its tolerance ({len(report['layers'])} compared)")
    else:
        layer = next((la for la in report["layers"] if la["index"] == first), None)
        estimated = "estimated " if layer and layer.get("estimated") else ""
        detail = (
            f": {estimated}rel_diff {fmt(layer['rel_diff'])} > tolerance {fmt(layer['tolerance'])}"
            if layer
            else ""
        )
        name = f" ({layer['name']})" if layer else ""
        lines.append(f"layers: first diverging hidden state {first}{name}{detail}")
    routed = [la for la in report["layers"] if la["routing"] is not None]
    if routed:
        rates = [
            la["routing"]["set_equal_rate"] for la in routed if la["routing"]["set_equal_rate"] is not None
        ]
        flips = sum(la["routing"]["flips"] for la in routed)
        near = sum(la["routing"]["flips_at_near_tie"] for la in routed)
        lo = fmt(min(rates)) if rates else "n/a"
        lines.append(
            f"routing: min set-equal rate {lo} over {len(routed)} layers; {flips} flips ({near} at near-ties)"
        )
    greedy = report["greedy"]["prompts"]
    equal = sum(g["reference_tokens"] == g["jax_tokens"] for g in greedy)
    if greedy:
        lines.append(
            f"greedy: exact match {equal}/{len(greedy)} ({pct(report['greedy']['exact_match_rate'])})"
        )
    else:
        lines.append("greedy: no generations")
    divs = [g for g in greedy if g["divergence"] is not None or g["first_divergence"] is not None]
    for g in divs[:5]:
        d = g["divergence"]
        if d is None:
            lines.append(f"  - prompt {g['prompt']}: first divergence at token {g['first_divergence']}")
        else:
            lines.append(
                f"  - prompt {g['prompt']}: token {d['position']}: ref {d['reference_token']} vs jax {d['jax_token']}, "
                f"{d['classification']} (gap ref {fmt(d['reference_logprob_gap'])}, jax {fmt(d['jax_logprob_gap'])})"
            )
    if len(divs) > 5:
        lines.append(f"  - ... and {len(divs) - 5} more")
    det = report["determinism"]
    failed = [d for d in det if not d["passed"]]
    lines.append(
        f"determinism: {len(det) - len(failed)}/{len(det)} checks passed" if det else "determinism: not run"
    )
    _listed(lines, [f"FAILED {d['name']} ({d['kind']}): {d['detail']}" for d in failed], 3)
    replay = report["replay"]
    if replay is None:
        lines.append("replay: not run")
    else:
        lines.append(f"replay ({replay['reasoning_split']}, cap {replay['max_new_tokens_cap']} new tokens):")
        for t in replay["tasks"][:6]:
            lines.append(
                f"  {t['task']}: answers agree {pct(t['answer_agreement'])} of {t['items']}"
                + (f", {t['reproduced']} reproduced; " if "reproduced" in t else "; ")
                + f"EM logged {fmt(t['logged_em'])} replayed {fmt(t['replayed_em'])}; "
                f"F1 logged {fmt(t['logged_f1'])} replayed {fmt(t['replayed_f1'])}"
                + (f"; {t['quirk_items']} quirk" if t["quirk_items"] else "")
                + (f"; {t['prompt_hash_mismatches']} hash mismatches" if t["prompt_hash_mismatches"] else "")
                + (f"; {t['truncated_by_cap']} truncated" if t["truncated_by_cap"] else "")
            )
        if len(replay["tasks"]) > 6:
            lines.append(f"  ... and {len(replay['tasks']) - 6} more tasks")
        sub = replay["submission"]
        if sub is not None:
            lines.append(f"  submission {sub['path']}: {len(sub['output_mismatches'])} output mismatches")
    warnings = list(report["warnings"]) + ([f"replay: {w}" for w in replay["warnings"]] if replay else [])
    lines.append(f"warnings: {len(warnings)}")
    _listed(lines, warnings, 4)
    return "\n".join(_plain(line) for line in lines)
