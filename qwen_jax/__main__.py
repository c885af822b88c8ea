"""Command line: ``python -m qwen_jax generate --checkpoint DIR --prompt "..." [--chat] [--max-new-tokens N]``, and
``python -m qwen_jax serve --checkpoint DIR`` (an OpenAI-compatible server, ``qwen_jax.server``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_jax.server import add_serve_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="greedy generation, streamed to the terminal")
    gen.add_argument(
        "--checkpoint", required=True, type=Path, help="HF checkpoint dir (config, safetensors, tokenizer)"
    )
    gen.add_argument("--prompt", required=True, help="the prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    gen.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=False")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    add_serve_parser(commands)
    return parser


def _prompt_ids(args, tokenizer) -> list[int]:
    if not args.chat:
        return tokenizer.encode(args.prompt)
    from qwen_jax.chat import apply_chat_template, load_default_chat_template

    template = tokenizer.chat_template or load_default_chat_template()
    messages = [{"role": "user", "content": args.prompt}]
    text = apply_chat_template(template, messages, enable_thinking=not args.no_thinking)
    return tokenizer.encode(text)


def generate_command(args) -> int:
    from qwen_jax.generate import stream_generate
    from qwen_jax.loading import load_hf
    from qwen_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.checkpoint)
    model = load_hf(args.checkpoint, args.dtype)
    ids: list[int] = []
    shown = ""
    for token in stream_generate(model, _prompt_ids(args, tokenizer), max_new_tokens=args.max_new_tokens):
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(ids)[len(shown) :] + "\n")  # whatever is left, even a partial character
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qwen_jax.config import ConfigError
    from qwen_jax.loading import CheckpointError
    from qwen_jax.tokenizer import TokenizerLoadError

    try:
        if args.command == "serve":
            from qwen_jax.server import serve_command

            return serve_command(args)
        return generate_command(args)
    except (CheckpointError, ConfigError, TokenizerLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
