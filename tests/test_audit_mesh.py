"""``compare --mesh ep=4`` on 4 fake CPU devices gives the report of a one-device run (timestamps and the device
list aside), the device list recorded in the manifest. Two audit runs: marked slow."""

from __future__ import annotations

import os

import pytest
from mera_fixtures import MED
from test_audit_cli import read_report, run_audit

from audit import demo

pytestmark = pytest.mark.slow

DEVICE_KEYS = ("created", "device", "devices", "mesh", "xla_flags")


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
    assert without_devices(reports["ep=4"]) == without_devices(reports["none"])
