"""What the examples share: the checkpoint (the audit's demo by default), its tokenizer and prompts, and writing
the results (a JSON file and a PNG plot) into an output directory whole or not at all."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from audit import demo
from audit.atomic import atomic_directory
from audit.errors import AuditInputError
from audit.prompts import PromptSpec, load_checkpoint_tokenizer, read_prompts_file, render_all
from audit.records import Prompt
from qwen_jax.config import ConfigError
from qwen_jax.loading import CheckpointError


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="HF checkpoint dir with its tokenizer (default: the audit's demo checkpoint, built and cached "
        "on first use; needs torch and transformers once)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help="output directory (replaced whole)"
    )


def checkpoint_dir(path: Path | None) -> Path:
    """The checkpoint to use: ``path``, or the demo checkpoint (built on first use)."""
    if path is None:
        return demo.ensure_demo_checkpoint()
    if not path.is_dir():
        raise AuditInputError(f"{path}: checkpoint directory not found")
    if not (path / "config.json").is_file():
        raise AuditInputError(f"{path}: not an HF checkpoint directory (no config.json)")
    return path


def demo_prompt_specs() -> list[PromptSpec]:
    """The demo's chat prompts (MERA-style questions and two free-form ones)."""
    return [PromptSpec(p["name"], messages=tuple(p["messages"])) for p in demo.DEMO_PROMPTS]


def render_prompts(checkpoint: Path, prompts_file: Path | None) -> list[Prompt]:
    """The prompts of a JSONL file (``{"text": ...}`` or ``{"messages": [...]}`` per line, as ``python -m audit
    compare --prompts``) or the demo's, tokenized with the checkpoint's tokenizer and chat template."""
    specs = demo_prompt_specs() if prompts_file is None else read_prompts_file(prompts_file)
    return render_all(specs, load_checkpoint_tokenizer(checkpoint))


def write_results(out: Path, stem: str, results: dict, figure) -> None:
    """``out/stem.json`` and ``out/stem.png``, written into a temporary sibling and renamed into place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    with atomic_directory(out) as tmp:
        (tmp / f"{stem}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", "utf-8")
        FigureCanvasAgg(figure)
        figure.savefig(tmp / f"{stem}.png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Runs an example's ``main``; a bad input is one ``error:`` line and exit code 2."""
    try:
        main(argv)
    except (AuditInputError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
