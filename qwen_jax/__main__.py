"""Command line: ``python -m qwen_jax generate --checkpoint DIR --prompt "..." [--chat] [--max-new-tokens N]``, and
``python -m qwen_jax serve --checkpoint DIR`` (an OpenAI-compatible server, ``qwen_jax.server``).

Exit codes (:mod:`qwen_jax.cli_contract`): 0 done, 2 bad input (one line naming the problem), 3 internal error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_jax.cli_contract import OneLineParser, run_guarded
from qwen_jax.server import add_serve_parser


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m qwen_jax", description=__doc__)
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
    from qwen_jax.chat import load_default_chat_template, render_chat

    template = tokenizer.chat_template or load_default_chat_template()
    source = tokenizer.chat_template_source or "the Qwen3.6 chat template shipped with qwen_jax"
    messages = [{"role": "user", "content": args.prompt}]
    text = render_chat(template, messages, source=source, enable_thinking=not args.no_thinking)
    return tokenizer.encode(text)


def _check_limits(args, prompt: list[int]) -> None:
    """The limits of :mod:`qwen_jax.limits`, checked before the weights are loaded (the cheap ones before JAX
    is imported)."""
    from qwen_jax.config import ModelConfig
    from qwen_jax.limits import check_context, check_prompt_lengths

    check_prompt_lengths([len(prompt)], f"--prompt {args.prompt!r}")
    cfg = ModelConfig.from_json(args.checkpoint / "config.json")
    check_context(len(prompt), args.max_new_tokens, cfg.max_position_embeddings, "--prompt")
    import numpy as np

    from qwen_jax.limits import check_generation
    from qwen_jax.model import resolve_dtype

    length = len(prompt) + args.max_new_tokens
    check_generation(cfg, np.ones((1, len(prompt))), args.max_new_tokens, length, resolve_dtype(args.dtype))


def generate_command(args) -> int:
    from qwen_jax.cli_contract import BadInputError
    from qwen_jax.limits import check_max_new_tokens

    check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    if not args.checkpoint.is_dir():
        raise BadInputError(f"{args.checkpoint}: checkpoint directory not found")
    from qwen_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.checkpoint)
    prompt = _prompt_ids(args, tokenizer)
    _check_limits(args, prompt)
    from qwen_jax.generate import stream_generate
    from qwen_jax.loading import load_hf

    model = load_hf(args.checkpoint, args.dtype)
    ids: list[int] = []
    shown = ""
    for token in stream_generate(model, prompt, max_new_tokens=args.max_new_tokens):
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
    if args.command == "serve":
        from qwen_jax.server import serve_command

        return run_guarded(lambda: serve_command(args), (FileNotFoundError,))
    return run_guarded(lambda: generate_command(args), (FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
