"""``python -m audit compare`` and ``python -m audit record``.

Exit codes: 0 the two implementations agree within the tolerances, 1 they diverge, 2 a usage or input error (a
one-line message on stderr naming the problem and the path), 3 an unexpected internal error (one line on stderr; the
traceback is in ``REPORT_DIR/internal-error.log``, or a temporary file for ``record``). See
:mod:`qwen_jax.cli_contract`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from audit.errors import AuditInputError
from audit.records import DEFAULT_HIDDEN_STATES
from qwen_jax.cli_contract import OneLineParser, check_output_dir, run_guarded

DEFAULT_REPORT_DIR = "audit-report"


def _version() -> str:
    try:
        return importlib.metadata.version("qwen-jax-audit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, help="HF checkpoint dir (default: the built-in demo checkpoint)"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path, help='JSONL: {"text": ...} or {"messages": [...]} per line')
    source.add_argument(
        "--samples", type=Path, nargs="+", help="lm-eval --log_samples files (samples_*.jsonl)"
    )
    source.add_argument("--submission", type=Path, help="a MERA submission zip (with logs_public.zip inside)")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--limit", type=int, help="only the first N samples of each samples file")
    subset.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="a reproducible random subset of N samples per task (--sample-seed)",
    )
    parser.add_argument("--sample-seed", type=int, default=0, help="the seed of --sample (default 0)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="greedy tokens per prompt (default 256; the demo prompts: 24)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--reasoning-split",
        default=None,
        help="how replies split at </think> when replaying samples (see audit.scoring.ReasoningSplit)",
    )
    parser.add_argument(
        "--thinking",
        choices=("on", "off"),
        help="render logged samples with enable_thinking true/false (default: the template's own default, on)",
    )
    parser.add_argument(
        "--hidden-states",
        type=int,
        metavar="N",
        help=f"keep the reference's full hidden states for the first N prompts (default {DEFAULT_HIDDEN_STATES}); "
        "the others keep per-position summaries, and compare with a live reference recomputes them for a prompt "
        "that diverges (with --reference: the bundle's own)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m audit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="audit the JAX model against the PyTorch reference")
    _common(compare)
    compare.add_argument(
        "--jax-checkpoint", type=Path, help="the JAX side's weights: an Orbax dir or an HF dir"
    )
    compare.add_argument(
        "--mesh",
        help="the JAX side's device mesh: ep=N or dp=D,ep=N (default: every local device on ep when there is more "
        "than one), or none for one device",
    )
    compare.add_argument(
        "--batch-size",
        type=int,
        help="prompts per batch on the JAX side (batch-invariant: the results do not depend on it; default: the "
        "largest power of two up to 16 that the memory plan allows, see audit.batching)",
    )
    compare.add_argument("--reference", type=Path, help="a reference bundle from `record` (no torch needed)")
    compare.add_argument("--report", type=Path, default=Path(DEFAULT_REPORT_DIR), help="report directory")
    record = sub.add_parser("record", help="run the PyTorch reference once and save a bundle")
    _common(record)
    record.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be at least 1")
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.hidden_states is not None and args.hidden_states < 0:
        parser.error("--hidden-states must be at least 0")

    def body() -> int:
        if args.command == "record":
            check_output_dir(args.out, "--out")
        else:
            check_output_dir(args.report, "--report")
        from audit import run

        if args.command == "record":
            return run.record(args)
        return run.compare(args, version=_version())

    log_dir = args.report if args.command == "compare" else None
    return run_guarded(body, (AuditInputError, "audit.samples:SamplesError"), log_dir)


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
