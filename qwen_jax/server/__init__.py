"""``python -m qwen_jax serve``: the JAX model behind an OpenAI-compatible API, so that lm-evaluation-harness's
``local-chat-completions`` (or any OpenAI client) runs benchmarks on it.

* :mod:`qwen_jax.server.protocol`: request bodies and the OpenAI error body;
* :mod:`qwen_jax.server.engine`: loading, prompt rendering, batched greedy decoding, replies;
* :mod:`qwen_jax.server.batcher`: requests that arrive together decode together;
* :mod:`qwen_jax.server.app`: the FastAPI routes.

This module holds only the command-line arguments, so that ``python -m qwen_jax --help`` needs no FastAPI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_serve_parser", "serve_command"]


def add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions ...)")
    serve.add_argument("--checkpoint", required=True, type=Path, help="HF checkpoint dir or Orbax dir")
    serve.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    serve.add_argument("--mesh", help="device mesh, e.g. ep=8 or dp=2,ep=4 (default: one device)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name", help="the model id of /v1/models (default: the checkpoint dir name)"
    )
    serve.add_argument("--max-model-len", type=int, help="context length (default: max_position_embeddings)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together")
    serve.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests"
    )
    serve.add_argument(
        "--batch-invariant",
        action="store_true",
        help="a reply depends only on its own request (today: every request decodes alone, at batch 1)",
    )
    serve.add_argument(
        "--pad-to-multiple", type=int, default=64, help="prompt-length bucket of qwen_jax.generate (1: none)"
    )
    serve.add_argument(
        "--reasoning-parser",
        choices=("qwen3", "none"),
        default="qwen3",
        help="split reasoning_content/content at </think> as vLLM's qwen3 parser (none: all content)",
    )
    serve.add_argument("--log", type=Path, help="request log, JSONL (appended)")
    return serve


def _mesh(text: str | None, checkpoint: Path):
    if text is None:
        return None
    from conversion import UsageError
    from conversion.plan import parse_mesh
    from qwen_jax.config import ModelConfig
    from qwen_jax.sharding import make_mesh

    try:
        axes = parse_mesh(text, ModelConfig.from_json(checkpoint / "config.json"))
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return make_mesh(ep=axes["ep"], dp=axes["dp"])


def _check(args) -> None:
    for name in ("max_batch_size", "pad_to_multiple", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_wait_ms < 0:
        raise ValueError("--batch-wait-ms must not be negative")
    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"{args.checkpoint}: checkpoint directory not found")


def serve_command(args) -> int:
    """Loads the checkpoint and serves until interrupted. Bad arguments or checkpoint: ``error:`` and exit 2."""
    try:
        import uvicorn

        from qwen_jax.server.app import build_app
        from qwen_jax.server.engine import Engine, batching
    except ImportError as exc:
        print(
            f"error: the server needs the `serve` extra (pip install -e '.[serve]'): {exc}", file=sys.stderr
        )
        return 2
    try:
        _check(args)
        mesh = _mesh(args.mesh, args.checkpoint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    max_batch_size, generate_options = batching(args.max_batch_size, args.batch_invariant)
    engine = Engine.from_checkpoint(
        args.checkpoint,
        args.dtype,
        mesh,
        max_model_len=args.max_model_len,
        pad_to_multiple=args.pad_to_multiple,
        generate_options=generate_options,
    )
    app = build_app(
        engine,
        served_model_name=args.served_model_name or args.checkpoint.resolve().name,
        max_batch_size=max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        reasoning_parser=args.reasoning_parser,
        log_path=args.log,
    )
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
