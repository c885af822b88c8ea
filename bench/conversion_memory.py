"""Peak memory of ``python -m conversion convert`` and ``verify`` on a synthetic multi-GB checkpoint.

The checkpoint has the real layout and the real per-tensor sizes of Qwen3.6-35B-A3B where it matters (hidden 2048,
expert FFN 512, the real attention and DeltaNet shapes, fused 3-D experts, A_log and the gated-norm weight stored
as F32 as in the official files) with fewer layers, experts and vocabulary so that it fits this machine: 4 layers
(3 DeltaNet + 1 attention), 64 experts, vocab 65536. That is 2.3 GiB of random bf16 in 5 shards with an index,
whose largest tensors (embed_tokens, lm_head and each layer's gate_up_proj) are 256 MiB each, 1/9 of the model.
It is written tensor by tensor with the safetensors format laid out by hand (header first, then each tensor's
random bytes in 16 MiB chunks), so the generator never holds more than one chunk.

``convert`` and then ``verify`` run in subprocesses; each one's peak RSS comes from ``os.wait4`` (the
``RUSAGE_CHILDREN`` figure of that child alone), next to a bare interpreter that imports the same modules and
starts JAX (the fixed overhead).

The bound: fixed overhead + 3 x the largest tensor. ``convert`` holds a tensor as read plus its transposed or
cast copy (lm_head and the experts are transposed), and Orbax/TensorStore keep a write buffer of up to one more;
``verify`` holds the restored leaf and the rebuilt one plus the tensor as read.

Measured on the 2-core development machine (2026-11-30, jax 0.10.2, orbax-checkpoint 0.12.8; the numbers are in
``bench/conversion_memory_results.json``):

    checkpoint 2.26 GiB in 5 files, largest tensor 256 MiB; fixed overhead (imports + JAX start) 0.25 GiB
    convert: peak RSS 0.81 GiB in 27 s (fixed overhead + 2.2 x the largest tensor)
    verify:  peak RSS 0.88 GiB in 17 s (fixed overhead + 2.5 x the largest tensor)
    bound 1.00 GiB (fixed overhead + 3 x 256 MiB): both within; neither grows with the model (2.26 GiB).

Two fixes got it there (before them: convert 1.36 GiB, verify 1.22 GiB): Orbax's numpy handler deep-copies each
array before writing it (``deepcopy_host_arrays``; the converter's save is synchronous, so it is turned off), and
TensorStore's threads leave freed pages in their glibc arenas (``malloc_trim(0)`` after each leaf). The full-size
checkpoint's largest tensors are 970 MiB (embed_tokens, lm_head) and 1 GiB (each gate_up_proj), so the same bound
gives about 3.3 GiB there, for a 65 GiB model.

Usage: ``python bench/conversion_memory.py [--work DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_jax.config import ModelConfig  # noqa: E402
from qwen_jax.hf_layout import expected_hf_tensors  # noqa: E402

GIB = 1024**3
MIB = 1024**2
CHUNK = 16 * MIB
SHAPE = {"num_hidden_layers": 4, "num_experts": 64, "vocab_size": 65536}
F32_TENSORS = ("linear_attn.A_log", "linear_attn.norm.weight")
RESULTS = ROOT / "bench" / "conversion_memory_results.json"


def synthetic_config(shape: dict = SHAPE) -> dict:
    """The real config with ``shape``'s sizes; the last layer is full attention, the others DeltaNet."""
    raw = json.loads((ROOT / "qwen_jax" / "data" / "qwen3_6_35b_a3b_config.json").read_text())
    text = raw["text_config"]
    text.update(shape)
    text["layer_types"] = ["linear_attention"] * (text["num_hidden_layers"] - 1) + ["full_attention"]
    text.pop("full_attention_interval", None)
    return raw


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], rng) -> None:
    """A safetensors file of random finite values, header first, data streamed in chunks."""
    header, offset = {}, 0
    sizes = {"BF16": 2, "F32": 4}
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape, dtype in tensors.values():
            left = math.prod(shape)
            while left:
                n = min(left, CHUNK // sizes[dtype])
                if dtype == "BF16":  # clearing bit 14 keeps the exponent below 128: finite, |x| < 2
                    f.write((rng.integers(0, 2**16, n, dtype=np.uint16) & 0xBFFF).tobytes())
                else:
                    f.write(rng.standard_normal(n, dtype=np.float32).tobytes())
                left -= n


def build_checkpoint(path: Path, shape: dict = SHAPE) -> dict:
    path.mkdir(parents=True)
    raw = synthetic_config(shape)
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    cfg = ModelConfig.from_hf_dict(raw)
    layout = expected_hf_tensors(cfg)
    shards: dict[str, dict] = {}
    for name, shape in layout.items():
        layer = name.split(".")[3] if ".layers." in name else "other"
        file = f"model-{layer}.safetensors"
        dtype = "F32" if name.endswith(F32_TENSORS) else "BF16"
        shards.setdefault(file, {})[name] = (shape, dtype)
    rng = np.random.default_rng(0)
    weight_map = {}
    for file, tensors in shards.items():
        write_safetensors(path / file, tensors, rng)
        weight_map |= dict.fromkeys(tensors, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sizes = {n: math.prod(s) * (4 if n.endswith(F32_TENSORS) else 2) for n, s in layout.items()}
    return {
        "files": len(shards),
        "tensors": len(layout),
        "total_bytes": sum(sizes.values()),
        "largest_tensor_bytes": max(sizes.values()),
        "largest_tensors": sorted(n for n, b in sizes.items() if b == max(sizes.values())),
    }


def run_measured(argv: list[str]) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of one child process, from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(output.decode(errors="replace")[-3000:])
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux: KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--no-record", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="conversion_memory_"))
    hf, out = work / "hf", work / "orbax"
    try:
        t = time.perf_counter()
        info = build_checkpoint(hf)
        print(
            f"synthetic checkpoint: {info['total_bytes'] / GIB:.2f} GiB in {info['files']} files "
            f"({time.perf_counter() - t:.0f} s); largest tensor {info['largest_tensor_bytes'] / MIB:.0f} MiB"
        )
        baseline_code = "import jax, orbax.checkpoint, conversion.convert, conversion.verify; jax.numpy.zeros(1).block_until_ready()"
        _, _, baseline = run_measured([sys.executable, "-c", baseline_code])
        py = [sys.executable, "-m", "conversion"]
        rc_c, t_c, rss_c = run_measured([*py, "convert", "--hf", str(hf), "--out", str(out), "--no-progress"])
        rc_v, t_v, rss_v = run_measured([*py, "verify", "--hf", str(hf), "--ckpt", str(out), "--no-progress"])
        bound = baseline + 3 * info["largest_tensor_bytes"]
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "checkpoint": {**info, "shape_overrides": SHAPE},
            "fixed_overhead_rss_bytes": baseline,
            "bound_bytes": bound,
            "bound": "fixed overhead + 3 x largest tensor",
            "convert": {"exit_code": rc_c, "seconds": round(t_c, 1), "peak_rss_bytes": rss_c},
            "verify": {"exit_code": rc_v, "seconds": round(t_v, 1), "peak_rss_bytes": rss_v},
            "within_bound": rss_c <= bound and rss_v <= bound,
        }
        if not args.no_record:
            RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        for job, rss in (("convert", rss_c), ("verify", rss_v)):
            print(
                f"{job}: peak RSS {rss / GIB:.2f} GiB (bound {bound / GIB:.2f} GiB, model {info['total_bytes'] / GIB:.2f} GiB)"
            )
        return 0 if rc_c == rc_v == 0 and result["within_bound"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
