"""What the batch-invariant mode costs, and what batching buys back: greedy decode and prefill tokens/s of
``batch_invariant=True`` against the default mode, at several batch sizes, on the bench config of
``bench/decode_vs_hf.py`` (hidden 512, 8 layers, 32 experts top-4, vocab 32k), random weights.

    python bench/batch_invariance.py [--prompt 128] [--new 32] [--batches 1,8,16,32] [--dtype float32]
                                     [--repeats 3] [--json OUT]

Each (mode, batch) runs the same work: ``batch`` prompts of ``--prompt`` tokens (different tokens per row), a
prefill that fills the decode state (``qwen_jax.generate._prefill``, the last position's logits), then the compiled
decode loop for ``--new`` greedy tokens (``--new`` - 1 model steps). Prefill tokens/s = batch x prompt / prefill
seconds; decode tokens/s = batch x (new - 1) / decode seconds; best of ``--repeats`` runs after a compile run.
The headline: invariant decode at batch 16 against default decode at batch 1, the speed an audit gains by batching
in the invariant mode (target >= 4x on this CPU). The invariant mode's rows are also checked: every row's tokens
at batch B equal the same prompt's tokens at batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_hf import BENCH_CONFIG, build_checkpoint

HEADLINE_BATCH = 16
TARGET = 4.0


def prompts(batch: int, n_prompt: int):
    import numpy as np

    return (
        np.random.RandomState(batch).randint(0, BENCH_CONFIG["vocab_size"], (batch, n_prompt)).astype("int32")
    )


def measure(model, ids, n_new: int, invariant: bool, repeats: int) -> dict:
    """Best-of-``repeats`` prefill and decode seconds for one batch, after a compile run; and the tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen_jax.generate import _decode_loop, _prefill

    graphdef, params = nnx.split(model)
    mask = ids * 0 + 1
    max_length = ids.shape[1] + n_new
    stop = jnp.asarray([-1], jnp.int32)

    def once():
        t = time.perf_counter()
        logits, cache = _prefill(graphdef, params, ids, mask, max_length, "auto", invariant)
        jax.block_until_ready(cache)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        tokens, _, _, _ = _decode_loop(
            graphdef, params, logits, cache, n_new, stop, 0, "auto", False, invariant
        )
        tokens = jax.block_until_ready(tokens)
        return t_prefill, time.perf_counter() - t, tokens

    t = time.perf_counter()
    once()
    compile_s = time.perf_counter() - t
    runs = [once() for _ in range(repeats)]
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    batch, n_prompt = ids.shape
    return dict(
        batch=batch,
        invariant=invariant,
        compile_s=round(compile_s, 2),
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_tok_s=batch * n_prompt / prefill_s,
        decode_tok_s=batch * (n_new - 1) / decode_s,
        tokens=runs[0][2][:, :n_new].tolist(),
    )


def run(path: str, dtype: str, batches: list[int], n_prompt: int, n_new: int, repeats: int) -> dict:
    import numpy as np

    from qwen_jax.loading import load_hf

    model = load_hf(path, dtype)
    results = []
    for batch in sorted(set(batches) | {1, HEADLINE_BATCH}):
        ids = prompts(batch, n_prompt)
        for invariant in (False, True):
            results.append(measure(model, ids, n_new, invariant, repeats))
            r = results[-1]
            print(
                f"{'invariant' if invariant else 'default  '} batch {batch:3d}: prefill {r['prefill_tok_s']:8.1f} "
                f"tok/s, decode {r['decode_tok_s']:8.1f} tok/s (compile {r['compile_s']} s)",
                flush=True,
            )
    # Invariance check: each row of the headline batch, alone at batch 1, in the invariant mode.
    headline_ids = prompts(HEADLINE_BATCH, n_prompt)
    batched = next(r for r in results if r["batch"] == HEADLINE_BATCH and r["invariant"])["tokens"]
    for row in (0, HEADLINE_BATCH - 1):
        alone = measure(model, headline_ids[row : row + 1], n_new, True, 1)["tokens"][0]
        assert alone == batched[row], f"row {row}: batch-{HEADLINE_BATCH} tokens differ from batch 1"

    def speed(batch, invariant, phase):
        return next(r for r in results if r["batch"] == batch and r["invariant"] == invariant)[phase]

    headline = speed(HEADLINE_BATCH, True, "decode_tok_s") / speed(1, False, "decode_tok_s")
    slowdown = {
        b: dict(
            decode=speed(b, False, "decode_tok_s") / speed(b, True, "decode_tok_s"),
            prefill=speed(b, False, "prefill_tok_s") / speed(b, True, "prefill_tok_s"),
        )
        for b in sorted({r["batch"] for r in results})
    }
    for r in results:
        del r["tokens"]
    print(
        f"headline: invariant batch-{HEADLINE_BATCH} decode / default batch-1 decode = {headline:.2f}x "
        f"(target >= {TARGET}x)"
    )
    for b, s in slowdown.items():
        print(f"default / invariant at batch {b:3d}: decode {s['decode']:.2f}x, prefill {s['prefill']:.2f}x")
    return dict(
        config="bench config of bench/decode_vs_hf.py",
        dtype=dtype,
        prompt=n_prompt,
        new=n_new,
        headline_ratio=headline,
        target=TARGET,
        slowdown_default_over_invariant=slowdown,
        runs=results,
        rows_checked_alone=[0, HEADLINE_BATCH - 1],
        np_version=np.__version__,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp))
        result = run(
            tmp, args.dtype, [int(b) for b in args.batches.split(",")], args.prompt, args.new, args.repeats
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["headline_ratio"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
