"""The JAX prefill on ``decode_vs_hf.py``'s config: this tree against another git revision, paired.

    python bench/prefill_against.py REV [--dtype both] [--rounds 3] [--repeats 5] [--prompt 512] [--batch 1]
                                        [--checkpoint DIR]

``--checkpoint`` times another HF checkpoint instead (e.g. ``bench/real_width.py``'s cached real-width one).

REV's ``qwen_jax`` (``git archive``) and this tree's each run in their own subprocess, alternating REV, tree x
``--rounds``; each compiles and warms up the prefill (``qwen_jax.generate._prefill``, as ``profile_by_scope.py``
runs it: the last position's logits and the decode state), then times ``--repeats`` calls. Reported per dtype: each
side's median ms over all calls, the ratio REV / tree of the medians, each round's ratio (the spread under load),
and whether the two sides' logits are bitwise equal. For a change that should only make the prefill faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paired
from decode_vs_hf import build_checkpoint, prompt_ids


def worker(checkpoint: str, dtype: str, prompt: int, batch: int, repeats: int, logits_out: str) -> None:
    """Runs in a subprocess for the tree in ``PYTHONPATH`` (put first: ``paired`` puts this tree's root on the
    path): prints the timings as JSON."""
    sys.path.insert(0, os.environ["PYTHONPATH"])
    import jax
    import numpy as np
    from flax import nnx

    import qwen_jax
    from qwen_jax.generate import _prefill

    graphdef, params = nnx.split(qwen_jax.load_hf(checkpoint, dtype))
    ids = prompt_ids(prompt, rows=batch).astype("int32")
    args = (graphdef, params, ids, np.ones_like(ids), prompt + 128, "auto")
    logits = jax.block_until_ready(_prefill(*args))[0]
    np.save(logits_out, np.asarray(logits.astype("float32")))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(_prefill(*args))
        times.append(time.perf_counter() - t)
    print(json.dumps({"ms": [t * 1e3 for t in times], "qwen_jax": qwen_jax.__file__}))


def run_side(root: Path, args, checkpoint: str, dtype: str, logits_out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, __file__, "--worker", checkpoint, "--dtype", dtype]
    command += ["--prompt", str(args.prompt), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    done = subprocess.run(
        [*command, "--logits", logits_out], env=env, capture_output=True, text=True, cwd=root
    )
    if done.returncode:
        raise SystemExit(f"the side at {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rev_root: Path, args, checkpoint: str, dtype: str, tmp: Path) -> dict:
    import numpy as np

    sides = {"rev": rev_root, "tree": paired.ROOT}
    times = {name: [] for name in sides}
    rounds = []
    for i in range(args.rounds):
        medians = {}
        for name, root in sides.items():
            print(f"[{dtype}] round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr)
            result = run_side(root, args, checkpoint, dtype, str(tmp / f"{name}.npy"))
            assert result["qwen_jax"].startswith(str(root)), result["qwen_jax"]
            times[name] += result["ms"]
            medians[name] = statistics.median(result["ms"])
        rounds.append(medians["rev"] / medians["tree"])
    equal = np.array_equal(np.load(tmp / "rev.npy"), np.load(tmp / "tree.npy"))
    summary = {name: statistics.median(ms) for name, ms in times.items()}
    return {
        "dtype": dtype,
        "median_ms": summary,
        "ratio": summary["rev"] / summary["tree"],
        "round_ratios": rounds,
        "logits_bitwise_equal": bool(equal),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", nargs="?", help="the git revision to compare this tree against")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, help="an HF checkpoint dir (default: the bench config's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dtype, args.prompt, args.batch, args.repeats, args.logits)
        return 0
    if not args.rev:
        parser.error("give the git revision to compare against (e.g. HEAD~1)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(paired.ROOT), "archive", args.rev, "qwen_jax"], capture_output=True
        )
        if archive.returncode:
            raise SystemExit(f"git archive {args.rev}: {archive.stderr.decode().strip()}")
        rev_root = tmp / "rev"
        rev_root.mkdir()
        subprocess.run(["tar", "-x", "-C", str(rev_root)], input=archive.stdout, check=True)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "checkpoint"
            build_checkpoint(checkpoint)
        elif not (checkpoint / "config.json").is_file():
            raise SystemExit(f"--checkpoint {checkpoint}: no config.json there")
        dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
        for dtype in dtypes:
            result = compare(rev_root, args, str(checkpoint), dtype, tmp)
            ms = result["median_ms"]
            print(
                f"{dtype} prefill [{args.batch}, {args.prompt}]: {args.rev} {ms['rev']:.0f} ms, this tree "
                f"{ms['tree']:.0f} ms (medians); ratio {result['ratio']:.2f}x (per round "
                f"{min(result['round_ratios']):.2f}-{max(result['round_ratios']):.2f}x); "
                f"logits bitwise equal: {result['logits_bitwise_equal']}"
            )
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
