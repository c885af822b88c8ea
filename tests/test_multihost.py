"""Multi-host through JAX's own runtime: 2 processes on localhost (``jax.distributed.initialize``, gloo CPU
collectives), 2 fake devices each, one ("ep",) mesh over all 4. Each process restores only its devices' experts
from the Orbax checkpoint; the logits equal one process with 4 devices bitwise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = r"""
import os, sys
process_id, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
import qwen_jax
from qwen_jax.sharding import make_mesh

assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
mesh = make_mesh()
model = qwen_jax.load(checkpoint, mesh=mesh)
gate_up = model.layers[0].mlp.gate_up[...]
assert len(gate_up.addressable_shards) == 2 and not gate_up.is_fully_addressable
ids = np.random.RandomState(0).randint(0, 256, (2, 40)).astype(np.int32)
with jax.set_mesh(mesh):
    logits = qwen_jax.forward(model, ids)
if not logits.is_fully_addressable:
    logits = multihost_utils.process_allgather(logits, tiled=True)
np.save(os.path.join(out, f"logits{process_id}.npy"), np.asarray(logits))
"""

SINGLE = r"""
import sys
import jax, numpy as np
import qwen_jax
from qwen_jax.sharding import make_mesh

mesh = make_mesh(4, devices=jax.devices()[:4])
model = qwen_jax.load(sys.argv[1], mesh=mesh)
ids = np.random.RandomState(0).randint(0, 256, (2, 40)).astype(np.int32)
with jax.set_mesh(mesh):
    np.save(sys.argv[2], np.asarray(qwen_jax.forward(model, ids)))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    return dict(os.environ, XLA_FLAGS=flags.strip())


@pytest.fixture(scope="module")
def orbax_checkpoint(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost") / "orbax"
    hf = tiny_checkpoints("hv2hk_top2of8")
    command = [sys.executable, "-m", "conversion", "convert", "--hf", str(hf), "--out", str(out)]
    result = subprocess.run([*command, "--dtype", "float32", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_two_processes_equal_one_process_bitwise(orbax_checkpoint, tmp_path):
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), port, str(orbax_checkpoint), str(tmp_path)],
            env=env_with_devices(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
    single = subprocess.run(
        [sys.executable, "-c", SINGLE, str(orbax_checkpoint), str(tmp_path / "single.npy")],
        env=env_with_devices(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = np.load(tmp_path / "single.npy")
    for i in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"logits{i}.npy"), expected, err_msg=f"process {i}")
