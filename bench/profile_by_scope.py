"""Where the JAX side's time goes on ``bench/decode_vs_hf.py``'s config, by ``jax.named_scope``.

    python bench/profile_by_scope.py [--dtype float32|bfloat16] [--runs 5] [--prompt 512] [--checkpoint DIR]

``--checkpoint`` profiles another checkpoint instead (``bench/real_width.py``'s cached one: the real widths).

Traces (``jax.profiler``) the compiled ``generate`` prefill of a ``--prompt``-token prompt and one decode step
(cache length prompt + 128), ``--runs`` times each. Each trace event of XLA:CPU is a thunk named after its HLO
instruction; the instruction's ``op_name`` metadata in the compiled HLO gives its scope (``layer_i/`` then
``linear_attention``, ``full_attention`` or ``moe``; ``embed``; ``head``); a fusion or loop without metadata takes the
scope of the computations it calls, and loops are not counted themselves (their bodies' thunks are). Prints per
scope and per (scope, instruction kind) the thunk time per run, summed over threads. Eigen's asynchronous dots
(fp32) are timed only for their launch, so fp32 dots are under-counted; compare with the wall time printed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import paired  # noqa: F401  (puts the project root on sys.path)
from decode_vs_hf import build_checkpoint, prompt_ids

SCOPE_PART = re.compile(r"layer_\d+$|linear_attention$|full_attention$|moe$|embed$|head$")
#: Instructions whose thunks contain others' (loops, conditionals, calls): not counted themselves.
LOOPS = ("while", "conditional", "call")


def scope_of(op_name: str) -> str:
    """``jit(f)/layer_3/moe/...`` -> ``moe``; ``.../head/...`` -> ``head``; else ``other``."""
    parts = [p for p in op_name.split("/") if SCOPE_PART.match(p)]
    if not parts:
        return "other"
    if parts[0].startswith("layer_"):
        return parts[1] if len(parts) > 1 else "layer (norms, residual)"
    return parts[0]


def instruction_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> scope, from its ``op_name``; one without takes the most common scope of the
    computations it calls. Loops, conditionals and calls (:data:`LOOPS`, by opcode: a conditional may be named
    ``cond.N``) are left out."""
    own, in_computation, calls, current = {}, collections.defaultdict(collections.Counter), {}, None
    loops = set()
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if head and " = " not in line:
            current = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        opcode = re.search(r"\s([a-z][\w\-]*)\(", line[m.end() - 1 :])  # after the (maybe tuple) type
        if opcode and opcode.group(1) in LOOPS:
            loops.add(m.group(1))
        op = re.search(r'op_name="([^"]+)"', line)
        if op:
            own[m.group(1)] = scope_of(op.group(1))
            in_computation[current][own[m.group(1)]] += 1
        called = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
        if called:
            calls[m.group(1)] = called
    for name, called in calls.items():
        if name not in own:
            votes = collections.Counter()
            for c in called:
                votes.update(in_computation.get(c, {}))
            own[name] = votes.most_common(1)[0][0] if votes else "other"
    return {name: scope for name, scope in own.items() if name not in loops}


def profile(jitted, args: tuple, runs: int, label: str, top: int = 10) -> None:
    import jax

    scopes = instruction_scopes(jitted.lower(*args).compile().as_text())
    jax.block_until_ready(jitted(*args))
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(runs):
                t = time.perf_counter()
                jax.block_until_ready(jitted(*args))
                walls.append(time.perf_counter() - t)
        with gzip.open(next(Path(tmp).rglob("perfetto_trace.json.gz"))) as f:
            trace = json.load(f)
    by_scope, by_kind = collections.Counter(), collections.Counter()
    for event in trace["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in scopes:
            continue
        by_scope[scopes[name]] += event["dur"] / runs / 1e3
        by_kind[scopes[name], re.sub(r"\.\d+$", "", name)] += event["dur"] / runs / 1e3
    walls.sort()
    print(
        f"== {label}: wall median {walls[len(walls) // 2] * 1e3:.1f} ms over {runs} runs; thunk ms per run:"
    )
    for scope, ms in by_scope.most_common():
        print(f"   {scope:24s} {ms:8.2f}")
    print("   largest (scope, instruction kind):")
    for (scope, kind), ms in by_kind.most_common(top):
        print(f"   {scope:24s} {kind:40s} {ms:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument(
        "--top", type=int, default=10, help="how many (scope, instruction kind) rows to print"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="rows (different prompts: a batch touches more experts)"
    )
    parser.add_argument(
        "--invariant", action="store_true", help="the batch-invariant mode (batch_invariant=True)"
    )
    parser.add_argument("--checkpoint", type=Path, help="this checkpoint instead of the bench config's")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import qwen_jax
    from qwen_jax.generate import _prefill, decode_step
    from qwen_jax.invariance import batch_invariant_mode

    if args.checkpoint:
        model = qwen_jax.load_hf(str(args.checkpoint), args.dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_checkpoint(Path(tmp))
            model = qwen_jax.load_hf(tmp, args.dtype)
    graphdef, params = nnx.split(model)
    ids = prompt_ids(args.prompt, rows=args.batch).astype("int32")
    mask, max_length = np.ones_like(ids), args.prompt + 128
    prefill = (graphdef, params, ids, mask, max_length, "auto", args.invariant)
    mode = "invariant" if args.invariant else "default"
    profile(
        _prefill, prefill, args.runs, f"prefill [{args.batch}, {args.prompt}] {args.dtype} {mode}", args.top
    )
    _, cache = _prefill(*prefill)

    def one_step(p, token, c):
        with batch_invariant_mode(args.invariant):
            return decode_step(nnx.merge(graphdef, p), token, c)

    token = jnp.arange(1, args.batch + 1, dtype=jnp.int32) * 997  # a different token per row
    profile(
        jax.jit(one_step), (params, token, cache), args.runs, f"decode step {args.dtype} {mode}", args.top
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
