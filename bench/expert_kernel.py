"""The routed experts of a decode step on the CPU: the native in-place grouped matmul (``qwen_jax.kernels``, via
``moe.kernel_expert_ffn``) against XLA's paths (``moe.gather_expert_ffn``, ``moe.blocked_expert_ffn`` with 4-row
blocks), paired and interleaved in one process.

    python bench/expert_kernel.py [--rows 4,64] [--dtype both] [--steps 10] [--repeats 7] [--json OUT]

The bench config of ``bench/decode_vs_hf.py``: hidden 512, 32 experts top-4, moe_intermediate 256 (gate_up
[32, 512, 512], down [32, 256, 512]), 8 layers with their own weights. A "step" runs the 8 layers' expert FFNs on
``rows`` (token, slot) rows sorted by expert, routed at random (top-4 distinct experts per token), another routing
each step (so the touched experts' weights are not the previous step's, still in cache): 4 rows is a batch-1 decode
step, 64 a batch-16 one. The steps run in a compiled ``fori_loop``, as in the decode loop (so the buffers are
allocated once); ms per step is the median over ``--repeats`` runs of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_hf import BENCH_CONFIG


def step_function(ffn, n_layers: int, n_steps: int):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def steps(x, group_sizes, gate_ups, downs):
        def one_step(step, x):
            for layer in range(n_layers):  # each layer's output feeds the next (RMS-normalised: no overflow)
                y = x + ffn(x, group_sizes[step], gate_ups[layer], downs[layer])
                x = (y * jax.lax.rsqrt(jnp.mean(jnp.square(y.astype("float32"))) + 1e-6)).astype(x.dtype)
            return x

        return jax.lax.fori_loop(0, n_steps, one_step, x)

    return steps


def routing(rng, tokens: int, n_experts: int, top_k: int):
    """One step's group sizes [E]: each token's top-k distinct experts at random."""
    import numpy as np

    experts = np.concatenate([rng.choice(n_experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(experts, minlength=n_experts).astype(np.int32)


def run(rows_list: list[int], dtypes: list[str], n_steps: int, repeats: int) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np

    from qwen_jax import kernels, moe

    if not kernels.enabled():
        raise SystemExit("the CPU kernel is not available here (see the warning above)")
    c = BENCH_CONFIG
    n_layers, n_experts, top_k = c["num_hidden_layers"], c["num_experts"], c["num_experts_per_tok"]
    hidden, inter = c["hidden_size"], c["moe_intermediate_size"]
    backends = {
        "kernel": moe.kernel_expert_ffn,
        "gather": moe.gather_expert_ffn,
        "blocked4": lambda *a: moe.blocked_expert_ffn(*a, moe.DECODE_EXPERT_BLOCK),
    }
    rng = np.random.default_rng(0)
    results = []
    for dtype in dtypes:
        gate_ups = [
            jnp.asarray(rng.normal(0, 0.02, (n_experts, hidden, 2 * inter)), dtype) for _ in range(n_layers)
        ]
        downs = [jnp.asarray(rng.normal(0, 0.02, (n_experts, inter, hidden)), dtype) for _ in range(n_layers)]
        for n_rows in rows_list:
            tokens = n_rows // top_k
            group_sizes = jnp.asarray(
                np.stack([routing(rng, tokens, n_experts, top_k) for _ in range(n_steps)])
            )
            x = jnp.asarray(rng.normal(0, 1, (tokens * top_k, hidden)), dtype)
            fns = {name: step_function(ffn, n_layers, n_steps) for name, ffn in backends.items()}
            outs = {
                name: np.asarray(f(x, group_sizes, gate_ups, downs), np.float32) for name, f in fns.items()
            }
            times = {name: [] for name in fns}
            for _ in range(repeats):
                for name, f in fns.items():
                    t = time.perf_counter()
                    f(x, group_sizes, gate_ups, downs).block_until_ready()
                    times[name].append(time.perf_counter() - t)
            ms = {name: round(float(np.median(t)) * 1e3 / n_steps, 2) for name, t in times.items()}
            row = {
                "dtype": dtype,
                "rows": int(x.shape[0]),
                "experts_touched_per_layer": round(float((group_sizes > 0).sum(axis=1).mean()), 1),
                "ms_per_step": ms,
                "kernel_speedup": {n: round(ms[n] / ms["kernel"], 2) for n in ms if n != "kernel"},
                "max_abs_diff_vs_gather": {
                    n: float(np.abs(outs[n] - outs["gather"]).max()) for n in outs if n != "gather"
                },
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="4,64")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    results = run([int(r) for r in args.rows.split(",")], dtypes, args.steps, args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"date": "2026-12-02", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
