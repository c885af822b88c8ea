"""The audit itself: the reference run against the JAX run, localisation, verdict, and the report dict.

Tolerances. In bfloat16 they are calibrated on the reference itself. Let e be how far the reference in bfloat16
is from the reference in float32 on the same tokens (p99 of the per-position max |logit diff|, mean KL, per-layer
rel_diff of every hidden state). A faithful bfloat16 port is no further than e from the float32 truth either, so by
the triangle inequality it is within 2e of the bfloat16 reference for a distance (max |diff|) and 4e for the
measures that grow with the square of a perturbation (KL, rel_diff). Those are the tolerances. Rounding where the
reference rounds keeps the port far closer at first (one-token bf16 forwards are bitwise equal,
``tests/test_model_parity.py``), but one flipped rounding in fp32 noise propagates, and over many layers the two
bf16 errors decorrelate: on the demo, JAX-bf16 vs HF-bf16 measured 0.73e (mean KL) and 0.93e (p99 max |diff|).
In float32 they are fixed, from the parity tests: p99 max |logit diff| 1e-4, mean KL 1e-6, hidden-state rel_diff
1e-8 (about 1e-4 relative RMS error).

Hidden states held as summaries only. Both sides keep every prompt's hidden states as per-position summaries (L2
norms and sketches, :func:`audit.metrics.summarise_hidden`) and the full states only for the ``--hidden-states``
prompts (and, with a live reference, a diverging prompt's, recomputed on both sides). Where both sides hold a
prompt's full states its terms are exact; otherwise its rel_diff terms are estimated from the summaries
(:func:`audit.metrics.prompt_layer_terms`: ||sketch(x) - sketch(y)||^2, an unbiased estimate of ||x - y||^2, over
the exact norms' ||x||^2 + ||y||^2), and the result is judged against the same per-layer tolerance, derived the
same way: in bfloat16 the calibration's e is itself estimated from the same summaries for those prompts (the
float32 reference summarised with the same projections), in float32 it is the fixed 1e-8. The estimate's relative
error is sqrt(2 / 16) = 0.35 for a departure at one position, and falls as 1 / sqrt(n) over n positions departing
alike (to 0.044 for one direction repeated at every position: the pool of 64 projections), well inside the 4x
between e and the tolerance; equal states give exactly 0. Such layers are marked ``estimated`` and have no max
|diff|; they point to the position that departs most instead.

Verdict: "diverge" (exit 1) when a hidden state or the logits hold NaN or inf on either side (named where they first
appear, never compared as numbers), when a logit metric or a hidden state exceeds its tolerance, when a greedy output
diverges where the two tokens are not in each other's top 5 (vLLM's check_logprobs_close rule: otherwise it is a
near-tie), or when the JAX side is not bitwise reproducible run to run. Routing flips are reported per layer with
the reference's k-th/(k+1)-th probability margin; flips at near-ties are not bugs and do not decide the verdict.

A second verdict, on the submission, when logged samples are replayed (``--samples``/``--submission``): the
submission is "not reproduced" (exit 1) when the replay's final answer (after the reasoning split and MERA's
filter: what MERA scores) differs from the logged one on ANY item, or when a submission zip's outputs differ from
its logs (:data:`SUBMISSION_RULE`). An item whose reply differs but whose final answer agrees is named, not failed.
``verdict.failed`` lists which verdicts failed: "port", "submission" or both.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

import numpy as np

from audit import metrics
from audit.jax_side import JaxRun
from audit.manifest import contract_differences
from audit.records import ReferenceRun

REPORT_SCHEMA_VERSION = 1
FP32_TOLERANCES = {"mean_kl": 1e-6, "p99_max_abs": 1e-4, "layer_rel_diff": 1e-8}
#: Calibrated tolerances: the triangle inequality for a distance, its square for quadratic measures.
DISTANCE_FACTOR = 2.0
QUADRATIC_FACTOR = DISTANCE_FACTOR**2
#: Router-probability margins (k-th minus (k+1)-th) below which a routing flip counts as a near-tie.
NEAR_TIE = {"float32": 1e-6, "bfloat16": 2.0**-8}
CLAIM = (
    "Agreement of the JAX reimplementation with the PyTorch reference (transformers) on this checkpoint and these "
    "prompts: teacher-forced logits, per-layer hidden states, MoE routing and greedy outputs. It does not by itself "
    "verify leaderboard scores, which need the private gold answers and the original serving stack."
)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    source: str  # "calibrated" | "fixed"
    description: str
    mean_kl: float
    p99_max_abs: float
    layers: tuple[float, ...]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "logits": {"mean_kl": self.mean_kl, "p99_max_abs": self.p99_max_abs},
            "layers": list(self.layers),
        }


def tolerances(dtype: str, calibration: dict | None, n_states: int) -> Tolerances:
    if dtype == "float32" or calibration is None:
        return Tolerances(
            "fixed",
            "float32: fixed tolerances from the parity tests (p99 max |logit diff| 1e-4, mean KL 1e-6, "
            "hidden-state rel_diff 1e-8)",
            FP32_TOLERANCES["mean_kl"],
            FP32_TOLERANCES["p99_max_abs"],
            (FP32_TOLERANCES["layer_rel_diff"],) * n_states,
        )
    return Tolerances(
        "calibrated",
        f"{dtype}: e = how far the reference in {dtype} is from itself in float32 on the same tokens; a port "
        f"as accurate as the reference is within {DISTANCE_FACTOR:g}e of it (p99 max |logit diff|) and "
        f"{QUADRATIC_FACTOR:g}e for the quadratic measures (mean KL, per-layer rel_diff)",
        QUADRATIC_FACTOR * calibration["logits"]["kl"]["mean"],
        DISTANCE_FACTOR * calibration["logits"]["max_abs"]["p99"],
        tuple(QUADRATIC_FACTOR * x for x in calibration["layers"]),
    )


def layer_names(layer_types: Sequence[str]) -> list[str]:
    names = ["embeddings"] + [f"layer {i} ({kind})" for i, kind in enumerate(layer_types)]
    names[-1] += " + final norm"
    return names


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float | np.floating):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def hidden_terms(reference: ReferenceRun, jax_run: JaxRun) -> list[metrics.PromptLayerTerms]:
    """Per prompt, the hidden-state terms of both sides: exact where both hold the full states, else from the
    summaries (norms and sketches: :func:`audit.metrics.prompt_layer_terms`)."""
    return [
        metrics.prompt_layer_terms(ref.hidden_states(), ours.hidden_states())
        for ref, ours in zip(reference.sequences, jax_run.sequences, strict=True)
    ]


def layer_entries(
    reference: ReferenceRun,
    jax_run: JaxRun,
    tol: Tolerances,
    names: Sequence[str],
    near_tie: float,
    terms: Sequence[metrics.PromptLayerTerms] | None = None,
) -> list[dict]:
    diffs = metrics.combine_layer_terms(hidden_terms(reference, jax_run) if terms is None else terms)
    entries = []
    for index, (diff, name) in enumerate(zip(diffs, names, strict=True)):
        routing = None
        if index > 0:
            layer = index - 1
            agreement = metrics.routing_agreement(
                [s.router_ids[layer] for s in reference.sequences],
                [s.router_probs[layer] for s in reference.sequences],
                [s.experts[layer] for s in jax_run.sequences],
                near_tie,
            )
            routing = dataclasses.asdict(agreement)
        at = diff.max_abs_at
        most = diff.departs_most_at
        entries.append(
            {
                "index": index,
                "name": name,
                "rel_diff": diff.rel_diff,
                "max_abs": diff.max_abs,
                "max_abs_at": None
                if at is None
                else dict(zip(("prompt", "position", "dim"), at, strict=True)),
                "tolerance": tol.layers[index],
                "exceeds": not diff.rel_diff <= tol.layers[index],  # NaN exceeds
                "routing": routing,
                "estimated": diff.estimated,
                "departs_most_at": None if most is None else {"prompt": most[0], "position": most[1]},
            }
        )
    return entries


def diverging_prompts(
    reference: ReferenceRun,
    jax_run: JaxRun,
    tol: Tolerances,
    terms: Sequence[metrics.PromptLayerTerms] | None = None,
) -> list[int]:
    """The prompts where the two sides diverge: their greedy tokens differ, a hidden state of theirs holds NaN or
    inf, or a hidden state that exceeds its tolerance over all prompts exceeds it on that prompt too (a prompt
    alone over a tolerance calibrated on all of them is not a divergence in a run that agrees)."""
    terms = hidden_terms(reference, jax_run) if terms is None else terms
    limits = np.asarray(tol.layers)
    exceeding = np.array(
        [not d.rel_diff <= limit for d, limit in zip(metrics.combine_layer_terms(terms), limits, strict=True)]
    )
    out = []
    for i, (ref, ours, t) in enumerate(zip(reference.sequences, jax_run.sequences, terms, strict=True)):
        greedy_differs = metrics.first_divergence(ref.generated, ours.generated) is not None
        non_finite = any(nf is not None for nf in t.non_finite)
        if greedy_differs or non_finite or (exceeding & ~(t.rel_diff() <= limits)).any():  # NaN exceeds
            out.append(i)
    return out


def full_states_needed(reference: ReferenceRun, jax_run: JaxRun, dtype: str) -> list[int]:
    """The diverging prompts (:func:`diverging_prompts`) whose full hidden states are not held by both sides: those
    a live run recomputes (each side where it lacks them)."""
    tol = tolerances(dtype, reference.calibration, reference.sequences[0].hidden_states().n_states)
    return [
        i
        for i in diverging_prompts(reference, jax_run, tol)
        if reference.sequences[i].hidden is None or jax_run.sequences[i].hidden is None
    ]


def hidden_states_section(
    reference: ReferenceRun, jax_run: JaxRun, tol: Tolerances, terms: Sequence[metrics.PromptLayerTerms]
) -> dict:
    """Which prompts were compared on their full hidden states and which on the summaries alone; a diverging
    prompt without full states (a bundle: they were not kept) is localised from the summaries."""
    diverging = diverging_prompts(reference, jax_run, tol, terms)
    return {
        "full": [i for i, t in enumerate(terms) if t.exact],
        "summaries_only": [i for i, t in enumerate(terms) if not t.exact],
        "diverging": diverging,
        "diverging_without_full": [i for i in diverging if not terms[i].exact],
        "sketch_dim": metrics.SKETCH_DIM,
    }


def greedy_section(reference: ReferenceRun, jax_run: JaxRun, decode) -> dict:
    prompts = []
    for i, (ref, ours, divergence) in enumerate(
        zip(reference.sequences, jax_run.sequences, jax_run.divergences, strict=True)
    ):
        first = metrics.first_divergence(ref.generated, ours.generated)
        entry = None
        if divergence is not None:
            entry = dataclasses.asdict(divergence) | {"classification": divergence.classification}
        prompts.append(
            {
                "prompt": i,
                "reference_tokens": [int(t) for t in ref.generated],
                "jax_tokens": [int(t) for t in ours.generated],
                "reference_text": decode(ref.generated),
                "jax_text": decode(ours.generated),
                "first_divergence": first,
                "divergence": entry,
            }
        )
    exact = sum(p["first_divergence"] is None for p in prompts)
    return {"exact_match_rate": exact / max(len(prompts), 1), "prompts": prompts}


def non_finite_findings(reference: ReferenceRun, jax_run: JaxRun, names: Sequence[str]) -> list[dict]:
    """Where NaN or inf first appear, per side: the lowest hidden-state index (then prompt and position), and
    the first logit position. A non-finite value is a divergence in itself, named where it first appears."""
    found = []
    for side, sequences in (("reference", reference.sequences), ("jax", jax_run.sequences)):
        at = metrics.first_non_finite([s.hidden_states().finite_probe() for s in sequences])
        if at is not None:
            index = at[0]
            found.append(
                {
                    "side": side,
                    "state": index,
                    "where": f"hidden state {index} = {names[index]}",
                    "at": at[1:],
                }
            )
    ref_logits = metrics.first_non_finite([s.logits.values[None] for s in reference.sequences])
    if ref_logits is not None:
        found.append({"side": "reference", "state": None, "where": "logits", "at": ref_logits[1:]})
    # the JAX logits are kept only as metrics against the reference; non-finite there with a finite reference
    jax_logits = metrics.first_non_finite(
        [np.asarray(m["max_abs"])[None, :] for m in jax_run.position_metrics]
    )
    if jax_logits is not None and ref_logits is None:
        found.append({"side": "jax", "state": None, "where": "logits", "at": jax_logits[1:]})
    return found


def _non_finite_reason(finding: dict) -> str:
    prompt, position = finding["at"]
    return (
        f"non-finite values: the {finding['side']} side's {finding['where']} first holds NaN or inf "
        f"(prompt {prompt}, position {position})"
    )


def _layer_departure(layer: dict) -> str:
    """rel_diff against the tolerance, and where the layer departs most: the max |diff| from full states, else the
    position the summaries point to."""
    at, text = layer["max_abs_at"], f"rel_diff {layer['rel_diff']:.3g} > {layer['tolerance']:.3g}"
    if layer.get("estimated"):
        text = "estimated " + text + " (from the per-position summaries)"
    if layer["max_abs"] is not None and at is not None:
        return (
            text + f", max |diff| {layer['max_abs']:.3g} at prompt {at['prompt']} position {at['position']} "
            f"dim {at['dim']}"
        )
    most = layer.get("departs_most_at")
    if most is not None:
        text += f", departing most at prompt {most['prompt']} position {most['position']}"
    return text + "; full hidden states not kept"


def verdict(
    logits_summary: dict,
    tol: Tolerances,
    layers: list[dict],
    greedy: dict,
    determinism: list[dict],
    non_finite: Sequence[dict] = (),
) -> dict:
    reasons = [_non_finite_reason(f) for f in non_finite]
    mean_kl, p99 = logits_summary["kl"]["mean"], logits_summary["max_abs"]["p99"]
    for label, value, limit in (("mean KL", mean_kl, tol.mean_kl), ("p99 max |diff|", p99, tol.p99_max_abs)):
        if not (np.isfinite(value) and np.isfinite(limit)):
            if not non_finite:
                reasons.append(f"logits: {label} is not finite ({value}; tolerance {limit})")
        elif value > limit:
            reasons.append(f"logits: {label} {value:.3g} exceeds the tolerance {limit:.3g}")
    states = [f["state"] for f in non_finite if f["state"] is not None]
    exceeding = [layer for layer in layers if layer["exceeds"] and np.isfinite(layer["rel_diff"])]
    candidates = states + [layer["index"] for layer in exceeding]
    first_layer = min(candidates) if candidates else None
    if exceeding and (not states or exceeding[0]["index"] < min(states)):
        layer = exceeding[0]
        reasons.append(
            f"first diverging layer: hidden state {layer['index']} = {layer['name']}: "
            + _layer_departure(layer)
        )
    for p in greedy["prompts"]:
        d = p["divergence"]
        if d is not None and d["classification"] == "bug":
            reasons.append(
                f"greedy: prompt {p['prompt']} diverges at generated token {d['position']} "
                f"(reference {d['reference_token']}, jax {d['jax_token']}), not a near-tie"
            )
    for check in determinism:
        if check["kind"] == "bitwise" and check["name"].startswith("jax") and not check["passed"]:
            reasons.append(f"determinism: {check['name']} is not bitwise reproducible")
    status = "diverge" if reasons else "agree"
    if not reasons:
        reasons.append(f"all metrics within the {tol.source} tolerances")
    return {
        "status": status,
        "exit_code": int(status == "diverge"),
        "reasons": reasons,
        "first_diverging_layer": first_layer,
    }


SUBMISSION_RULE = (
    "the submission is reproduced when every replayed final answer (after the reasoning split and MERA's filter) "
    "equals the logged one and the submission's outputs equal its logs; a single unreproduced final answer fails it"
)


def _shorten(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def describe_item(item: dict) -> str:
    """One line naming an item not reproduced: task, doc_id, logged vs replayed reply, and its class."""
    line = (
        f"{item['task']} doc {item['doc_id']}: logged {_shorten(item['logged_reply'])} vs replayed "
        f"{_shorten(item['replayed_reply'])}"
    )
    if item["classification"] is not None:
        line += f"; {item['classification']}"
    if item["first_divergence"] is not None:
        tie = {True: "a near-tie", False: "not a near-tie", None: "near-tie unknown"}[item["near_tie"]]
        line += f" (first divergence at generated token {item['first_divergence']}, {tie})"
    line += "; final answer " + ("agrees" if item["equal"] else "differs")
    if item["truncated_by_cap"]:
        line += " (cut short by --max-new-tokens)"
    return line


def submission_verdict(replay: dict | None) -> dict | None:
    """The verdict on the submission from the replay section (``None`` without a replay): see
    :data:`SUBMISSION_RULE`. ``reasons`` names every item not reproduced (:func:`describe_item`)."""
    if replay is None:
        return None
    items = replay["items"]
    named = [i for i in items if not i["reproduced"]]
    unreproduced = sum(not i["equal"] for i in items)
    outputs = [] if replay["submission"] is None else replay["submission"]["output_mismatches"]
    reasons = [describe_item(i) for i in named] + [
        f"submission output differs from the logs: {m}" for m in outputs
    ]
    failed = bool(unreproduced or outputs)
    return {
        "status": "not_reproduced" if failed else "reproduced",
        "rule": SUBMISSION_RULE,
        "items": len(items),
        "reproduced_items": len(items) - len(named),
        "unreproduced_final_answers": unreproduced,
        "reasons": reasons,
    }


def combine_verdicts(port: dict, submission: dict | None) -> dict:
    """The port verdict with the submission's beside it; the exit code is 1 when either failed."""
    failed = (["port"] if port["status"] == "diverge" else []) + (
        ["submission"] if submission is not None and submission["status"] == "not_reproduced" else []
    )
    return {**port, "exit_code": int(bool(failed)), "submission": submission, "failed": failed}


def build_report(
    *,
    reference: ReferenceRun,
    jax_run: JaxRun,
    settings: dict,
    jax_manifest: dict,
    layer_types: Sequence[str],
    decode,
    tool_version: str,
    replay: dict | None = None,
    warnings: Sequence[str] = (),
) -> dict:
    """The report dict (schema: ``audit/report.schema.json``)."""
    dtype = settings["dtype"]
    n_states = reference.sequences[0].hidden_states().n_states
    tol = tolerances(dtype, reference.calibration, n_states)
    near_tie = NEAR_TIE.get(dtype, NEAR_TIE["bfloat16"])
    names = layer_names(layer_types)
    terms = hidden_terms(reference, jax_run)
    layers = layer_entries(reference, jax_run, tol, names, near_tie, terms)
    hidden_states = hidden_states_section(reference, jax_run, tol, terms)
    non_finite = non_finite_findings(reference, jax_run, names)
    summary = metrics.summarise_positions(list(jax_run.position_metrics))
    greedy = greedy_section(reference, jax_run, decode)
    determinism = [*reference.determinism, *jax_run.determinism]
    differences = contract_differences(reference.manifest, jax_manifest)
    warnings = list(warnings) + [
        f"contract differs between the reference and the JAX run: {d['key']}: {d['reference']!r} vs {d['jax']!r}"
        for d in differences
    ]
    if hidden_states["diverging_without_full"]:
        warnings.append(
            f"full hidden states were not kept for the diverging prompt(s) {hidden_states['diverging_without_full']} "
            "(a bundle keeps them for its first --hidden-states prompts): their layers are compared on the "
            f"per-position summaries (norms and {metrics.SKETCH_DIM}-dim sketches; rel_diff estimated, no max |diff|)"
        )
    if replay is not None:
        warnings += list(replay.get("warnings", ()))
    per_position = [
        {
            "prompt": i,
            "kl": m["kl"].tolist(),
            "max_abs": m["max_abs"].tolist(),
            "top1_agree": [bool(x) for x in m["top1_agree"]],
            "ref_margin": m["ref_margin"].tolist(),
        }
        for i, m in enumerate(jax_run.position_metrics)
    ]
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": {"name": "qwen-jax-audit", "version": tool_version},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "claim": CLAIM,
        "verdict": combine_verdicts(
            verdict(summary, tol, layers, greedy, determinism, non_finite), submission_verdict(replay)
        ),
        "settings": settings,
        "manifest": {"reference": reference.manifest, "jax": jax_manifest, "differences": differences},
        "tolerances": tol.to_json(),
        "calibration": reference.calibration,
        "prompts": [
            {
                "index": i,
                "name": p.name,
                "text": p.text,
                "prompt_tokens": len(p.ids),
                "positions": len(s.tokens),
            }
            for i, (p, s) in enumerate(zip(reference.prompts, reference.sequences, strict=True))
        ],
        "logits": {"summary": summary, "per_position": per_position},
        "layers": layers,
        "hidden_states": hidden_states,
        "greedy": greedy,
        "determinism": determinism,
        "replay": replay,
        "warnings": warnings,
    }
    return _finite(report)
