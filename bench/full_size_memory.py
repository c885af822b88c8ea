"""Memory and compile time of the full-size programs, from XLA's own buffer assignment: no weights needed.

    python bench/full_size_memory.py [--layers 10,20,40] [--mesh 1,8] [--programs ...] [--json [OUT]]

Builds Qwen3.6-35B-A3B's configuration with the first N layers (the real widths; 10 groups of 3 DeltaNet + 1
attention layers at 40) as abstract bf16 parameters (``nnx.eval_shape``: no memory), ahead-of-time compiles each
program (``jax.jit(...).lower(...).compile()``) and reports ``memory_analysis()``: argument, temp and output bytes
per device, with the compile seconds (wall, and the process's CPU seconds: a figure that other processes on the
machine inflate less). Programs:

- ``forward_2048``: :func:`qwen_jax.forward` on [1, 2048] (full logits);
- ``prefill_2048``, ``prefill_4096``, ``prefill_32768``: the generate prefill of one row (last-token logits, fills
  the decode state of 2048 / 4096 / 32768 + 256 slots); a prompt longer than ``--prefill-segment`` tokens (default
  ``qwen_jax.generate.PREFILL_SEGMENT``, 4096) runs in segments of that many, each continuing the decode state,
  one compiled program run from Python per segment (``qwen_jax.generate._prefill_continued``): for it the figures
  are that program's;
- ``decode_b1``, ``decode_b8``: the decode loop (``lax.while_loop`` over steps) for batch 1 and 8, 2048 + 256 slots.

``--mesh 8`` compiles under an 8-device ``ep`` mesh (experts split, :mod:`qwen_jax.sharding`); on a CPU it fakes the
devices (``--xla_force_host_platform_device_count``), so run it as its own process (the script re-executes itself
per mesh size). The figures are per device. The ``acceptance`` part of the JSON checks issue 12's criteria: at the
largest layer count every bf16 program's temp is <= 10% of its argument bytes, the 32k prefill's temp is <= 8x the
4k prefill's, and each compile takes <= 25 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

PROGRAMS = ("forward_2048", "prefill_2048", "prefill_4096", "prefill_32768", "decode_b1", "decode_b8")
DECODE_SLACK = 256  # decode-state slots beyond the prompt
MAX_TEMP_FRACTION = 0.10
MAX_PREFILL_RATIO = 8.0
MAX_COMPILE_S = 25.0


def compile_program(name: str, cfg, mesh, prefill_segment: int | None = None):
    """AOT-compiles one program on abstract bf16 parameters; returns (compiled, seconds, CPU seconds of this
    process: all its threads, so less sensitive than the wall time to other processes on the machine)."""
    import importlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen_jax.cache import init_decode_state
    from qwen_jax.model import Qwen35MoeForCausalLM, _forward_jit
    from qwen_jax.sharding import activation_spec, param_spec

    generate = importlib.import_module("qwen_jax.generate")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen35MoeForCausalLM(cfg, "bfloat16")))

    def placed(tree, spec_of):
        if mesh is None:
            return tree
        sharding = jax.sharding.NamedSharding
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding(mesh, spec_of(a))), tree
        )

    if mesh is not None:  # experts split on ep, as shard_model places them
        flat = nnx.to_flat_state(params)
        for path, var in flat:
            value = var.get_value()
            spec = jax.sharding.NamedSharding(mesh, param_spec(path))
            var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=spec))
        params = nnx.from_flat_state(flat)
    replicated = lambda _: activation_spec(mesh)  # noqa: E731
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    kind, size = name.rsplit("_", 1)
    t, cpu = time.perf_counter(), time.process_time()
    if kind in ("forward", "prefill"):
        length = int(size)
        ids = placed(jax.ShapeDtypeStruct((1, length), jnp.int32), replicated)
        if kind == "forward":
            lowered = _forward_jit.lower(graphdef, params, ids, ids, ids, "auto", False)
        elif length <= (segment := prefill_segment or generate.PREFILL_SEGMENT):
            lowered = generate._prefill.lower(
                graphdef, params, ids, ids, length + DECODE_SLACK, "auto", False
            )
        else:  # the program every segment runs (the lengths here are whole segments), continuing the state
            if length % segment:
                raise SystemExit(f"{name}: the bench's long prefills are whole segments of {segment} tokens")
            window = placed(jax.ShapeDtypeStruct((1, segment), jnp.int32), replicated)
            state = jax.eval_shape(lambda: init_decode_state(cfg, 1, length + DECODE_SLACK, jnp.bfloat16))
            state = placed(state, replicated)
            lowered = generate._prefill_continued.lower(
                graphdef, params, window, window, window, state, "auto"
            )
    else:
        batch = int(size[1:])
        state = jax.eval_shape(lambda: init_decode_state(cfg, batch, 2048 + DECODE_SLACK, jnp.bfloat16))
        state = placed(state, replicated)
        logits = placed(jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.bfloat16), replicated)
        stop = jax.ShapeDtypeStruct((2,), jnp.int32)
        lowered = generate._decode_loop.lower(graphdef, params, logits, state, i32, stop, i32, "auto", False)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t, time.process_time() - cpu


def measure(
    layers: list[int], programs: list[str], ep: int, prefill_segment: int | None = None
) -> list[dict]:
    import jax

    from qwen_jax.config import ModelConfig
    from qwen_jax.sharding import make_mesh

    full = ModelConfig.qwen3_6_35b_a3b()
    if ep > len(jax.devices()):
        print(f"skipping ep={ep}: {len(jax.devices())} device(s)", file=sys.stderr)
        return []
    mesh = make_mesh(ep) if ep > 1 else None
    rows = []
    for n in layers:
        cfg = dataclasses.replace(full, num_hidden_layers=n, layer_types=full.layer_types[:n])
        for name in programs:
            if mesh is None:
                compiled, seconds, cpu_seconds = compile_program(name, cfg, None, prefill_segment)
            else:
                with jax.set_mesh(mesh):
                    compiled, seconds, cpu_seconds = compile_program(name, cfg, mesh, prefill_segment)
            memory = compiled.memory_analysis()
            row = dict(
                program=name,
                layers=n,
                devices=ep,
                compile_s=round(seconds, 2),
                compile_cpu_s=round(cpu_seconds, 2),
                argument_bytes=memory.argument_size_in_bytes,
                temp_bytes=memory.temp_size_in_bytes,
                output_bytes=memory.output_size_in_bytes,
            )
            row["temp_over_argument"] = round(row["temp_bytes"] / row["argument_bytes"], 4)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def acceptance(rows: list[dict]) -> dict:
    top = max(r["layers"] for r in rows)
    checks = {}
    for devices in sorted({r["devices"] for r in rows}):
        at_top = {r["program"]: r for r in rows if r["layers"] == top and r["devices"] == devices}
        worst = max(at_top.values(), key=lambda r: r["temp_over_argument"])
        checks[f"devices={devices}"] = {
            "layers": top,
            "max_temp_over_argument": worst["temp_over_argument"],
            "worst_program": worst["program"],
            "temp_within_10pct": worst["temp_over_argument"] <= MAX_TEMP_FRACTION,
            "max_compile_s": max(r["compile_s"] for r in at_top.values()),
            "compile_within_25s": all(r["compile_s"] <= MAX_COMPILE_S for r in at_top.values()),
        }
        if "prefill_32768" in at_top and "prefill_4096" in at_top:
            ratio = at_top["prefill_32768"]["temp_bytes"] / at_top["prefill_4096"]["temp_bytes"]
            checks[f"devices={devices}"]["prefill_32k_over_4k_temp"] = round(ratio, 2)
            checks[f"devices={devices}"]["prefill_linear"] = ratio <= MAX_PREFILL_RATIO
    return checks


def table(rows: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| program | layers | devices | compile s | compile CPU s | argument GiB | temp GiB | temp / argument | output GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['program']} | {r['layers']} | {r['devices']} | {r['compile_s']:.1f} | {r.get('compile_cpu_s', 0):.1f} | "
            f"{r['argument_bytes'] / gib:.2f} | {r['temp_bytes'] / gib:.2f} | {100 * r['temp_over_argument']:.1f}% | "
            f"{r['output_bytes'] / gib:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="10,20,40")
    parser.add_argument("--mesh", default="1,8", help="ep sizes, comma-separated (each in its own process)")
    parser.add_argument("--programs", default=",".join(PROGRAMS))
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="OUT", help="print the results as JSON (or write them to OUT)"
    )
    parser.add_argument(
        "--prefill-segment",
        type=int,
        help="tokens per prefill segment (default: qwen_jax.generate.PREFILL_SEGMENT)",
    )
    parser.add_argument("--one-mesh", type=int, help=argparse.SUPPRESS)  # the child process of one mesh size
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    programs = args.programs.split(",")
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        parser.error(f"unknown programs {unknown}; choose from {PROGRAMS}")
    if args.one_mesh is not None:  # the child: one mesh size, rows as JSON on stdout
        print(json.dumps(measure(layers, programs, args.one_mesh, args.prefill_segment)))
        return
    rows = []
    for ep in (int(n) for n in args.mesh.split(",")):
        env = dict(os.environ)
        if ep > 1 and "cpu" in env.get("JAX_PLATFORMS", "cpu"):
            env["XLA_FLAGS"] = (
                f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ep}".strip()
            )
        command = [sys.executable, __file__, "--layers", args.layers, "--programs", args.programs]
        if args.prefill_segment:
            command += ["--prefill-segment", str(args.prefill_segment)]
        done = subprocess.run([*command, "--one-mesh", str(ep)], env=env, stdout=subprocess.PIPE, check=True)
        rows += json.loads(done.stdout)
    result = {
        "platform": _platform(),
        "prefill_segment": args.prefill_segment or _default_segment(),
        "rows": rows,
        "acceptance": acceptance(rows),
    }
    if args.json != "-":
        print(table(rows))
        print(json.dumps(result["acceptance"], indent=1))
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.json)


def _default_segment() -> int:
    from qwen_jax.generate import PREFILL_SEGMENT

    return PREFILL_SEGMENT


def _platform() -> str:
    import jax

    return f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"


if __name__ == "__main__":
    main()
