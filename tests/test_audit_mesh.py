"""``compare --mesh ep=4`` on 4 fake CPU devices gives the report of a one-device run (timestamps and the device
list aside), the device list recorded in the manifest. Two audit runs: marked slow.

Not bitwise: the sharded MoE sums the experts' outputs in another order (qwen_jax.moe under a mesh), so the float
metrics (logit and hidden-state differences to the reference, around 1e-6 in float32) move in their last digits.
Everything else must be identical: tokens, texts, the replay, both verdicts, every count and flag; a difference to the
reference (max |diff|, KL, rel_diff) within the verdict's float32 tolerance of that measure
(audit.compare.FP32_TOLERANCES) of its one-device value (measured: up to 1.1e-5 on a per-position max |logit diff|,
against 1e-4), any other float equal to 1e-6 relative. Where a hidden state's max |diff| lies is not compared."""

from __future__ import annotations

import os

import pytest
from mera_fixtures import MED
from test_audit_cli import read_report, run_audit

from audit import demo
from audit.compare import FP32_TOLERANCES

pytestmark = pytest.mark.slow

# timestamps, devices, and where a hidden state's max |diff| to the reference lies, per coordinate or per position
# (the argmax of float32 noise)
DEVICE_KEYS = ("created", "device", "devices", "mesh", "xla_flags", "max_abs_at", "departs_most_at")


def without_devices(value):
    if isinstance(value, dict):
        return {k: without_devices(v) for k, v in value.items() if k not in DEVICE_KEYS}
    if isinstance(value, list):
        return [without_devices(v) for v in value]
    return value


def test_ep4_gives_the_one_device_report(tmp_path):
    checkpoint = demo.build_demo_checkpoint(tmp_path / "checkpoint")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    args = ["compare", "--checkpoint", str(checkpoint), "--samples", str(MED), "--limit", "2",
            "--max-new-tokens", "6", "--dtype", "float32"]  # fmt: skip
    reports = {}
    for mesh in ("none", "ep=4"):
        result = run_audit(*args, "--mesh", mesh, "--report", str(tmp_path / mesh), env={"XLA_FLAGS": flags})
        assert result.returncode in (0, 1), result.stdout + result.stderr
        reports[mesh] = read_report(tmp_path / mesh)
    jax_manifest = reports["ep=4"]["manifest"]["jax"]
    assert len(jax_manifest["devices"]) == 4 and jax_manifest["mesh"] == {"ep": 4}
    assert len(reports["none"]["manifest"]["jax"]["devices"]) == 1
    mismatches = list(differences(without_devices(reports["ep=4"]), without_devices(reports["none"])))
    assert not mismatches, (len(mismatches), sorted({m.split(":")[0].split("[")[0] for m in mismatches}))


def float_tolerance(path: str) -> dict:
    measures = (
        ("max_abs", "p99_max_abs"),
        ("mean_abs", "p99_max_abs"),
        ("kl", "mean_kl"),
        ("rel_diff", "layer_rel_diff"),
    )
    for part, measure in measures:
        if f".{part}" in path:
            return {"rel": 0, "abs": FP32_TOLERANCES[measure]}
    return {"rel": 1e-6, "abs": 1e-12}


def differences(a, b, path="$"):
    """Where two reports differ: any non-float value exactly, floats beyond :func:`float_tolerance`."""
    if isinstance(a, float) and isinstance(b, float):
        if a != pytest.approx(b, **float_tolerance(path)):
            yield f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        for key in a:
            yield from differences(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{path}[{k}]")
    elif a != b:
        yield f"{path}: {a!r} vs {b!r}"
