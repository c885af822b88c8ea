"""``python -m conversion {convert,verify,plan}``. Bad input prints one line naming the problem and exits 2;
``verify`` exits 1 on a mismatch; an unexpected internal error is one line and exit 3, its traceback in a log file
(:mod:`qwen_jax.cli_contract`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from conversion import UsageError, check_convert_paths
from qwen_jax.cli_contract import EXIT_BAD_INPUT, EXIT_FINDING, OneLineParser, run_guarded

EXIT_MISMATCH = EXIT_FINDING
EXIT_USAGE = EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m conversion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="HF safetensors checkpoint -> per-leaf Orbax checkpoint")
    convert.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors)")
    convert.add_argument("--out", required=True, help="output dir (must not exist, or be this conversion)")
    convert.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    convert.add_argument("--no-progress", action="store_true")
    verify = sub.add_parser(
        "verify", help="compare every tensor of a converted checkpoint with its HF source"
    )
    verify.add_argument("--hf", required=True)
    verify.add_argument("--ckpt", required=True)
    verify.add_argument("--no-progress", action="store_true")
    plan = sub.add_parser("plan", help="parameter counts and bytes per device on a mesh")
    plan.add_argument("--config", default=None, help="config.json (default: the packaged Qwen3.6-35B-A3B)")
    plan.add_argument("--mesh", default="ep=8", help="e.g. ep=8 or dp=2,ep=4")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--context", type=int, default=32768, help="decode state length in tokens")
    plan.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    plan.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_guarded(lambda: _run(args), (UsageError,))


def _run(args) -> int:
    if args.command == "convert":
        check_convert_paths(args.hf, args.out)  # before JAX is imported
        from conversion.convert import convert

        out = convert(args.hf, args.out, args.dtype, progress=not args.no_progress)
        print(f"converted {args.hf} -> {out}")
        return 0
    if args.command == "verify":
        from conversion.verify import verify

        report = verify(args.hf, args.ckpt, progress=not args.no_progress)
        for line in report.mismatches:
            print(f"MISMATCH {line}", file=sys.stderr)
        if not report.ok:
            print(f"verify: {len(report.mismatches)} mismatch(es) in {args.ckpt}", file=sys.stderr)
            return EXIT_MISMATCH
        print(
            f"verify: all {report.checked} leaves of {args.ckpt} equal {args.hf} bitwise, and the source files "
            "match the sha256 recorded at conversion"
        )
        return 0
    from conversion.plan import format_plan, memory_plan

    plan = memory_plan(args.config, args.mesh, args.batch, args.context, args.dtype)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
