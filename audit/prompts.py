"""Prompts for the audit: a JSONL file of raw texts or chat conversations, rendered with the checkpoint's tokenizer
and chat template exactly as transformers renders them.

Each line of ``--prompts FILE`` is a JSON object with either ``"text"`` (fed as is) or ``"messages"`` (rendered with
the chat template, ``add_generation_prompt=True``), and optionally ``"name"`` and ``"chat_template_kwargs"``
(for example ``{"enable_thinking": false}``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audit.errors import AuditInputError
from audit.manifest import sha256_file, sha256_text
from audit.records import Prompt
from qwen_jax.chat import RENDERER_ARGUMENTS, ChatTemplateError, load_default_chat_template, render_chat
from qwen_jax.tokenizer import QwenTokenizer, TokenizerLoadError, load_tokenizer


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    name: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TokenizerBundle:
    """The checkpoint's tokenizer and chat template, with any warning about them."""

    tokenizer: QwenTokenizer
    template: str
    warnings: tuple[str, ...]

    @property
    def template_sha256(self) -> str:
        return sha256_text(self.template)

    @property
    def template_source(self) -> str:
        """The file the template was read from, for error messages."""
        if self.tokenizer.chat_template is None:
            return "the Qwen3.6 chat template shipped with qwen_jax"
        return self.tokenizer.chat_template_source or "the checkpoint's chat template"

    @property
    def tokenizer_sha256(self) -> str:
        return sha256_file(self.tokenizer.path)


def load_checkpoint_tokenizer(checkpoint: Path) -> TokenizerBundle:
    """``tokenizer.json`` and the chat template of an HF checkpoint dir. The template is the checkpoint's; a
    template that differs from the Qwen3.6 one shipped with this project is a flagged warning (the audited
    run used the Qwen3.6 template), and a checkpoint without one falls back to the shipped one, also flagged."""
    try:
        tokenizer = load_tokenizer(checkpoint)
    except FileNotFoundError:
        raise AuditInputError(
            f"{checkpoint}: no tokenizer.json (a checkpoint dir needs its tokenizer)"
        ) from None
    except TokenizerLoadError as exc:
        raise AuditInputError(str(exc)) from None
    reference_template = load_default_chat_template()
    warnings = []
    template = tokenizer.chat_template
    if template is None:
        template = reference_template
        warnings.append(f"{checkpoint}: no chat template; using the Qwen3.6 template shipped with qwen_jax")
    elif template != reference_template:
        warnings.append(
            f"{checkpoint}: chat template differs from the Qwen3.6 template of the audited run "
            f"(sha256 {sha256_text(template)[:12]} vs {sha256_text(reference_template)[:12]})"
        )
    return TokenizerBundle(tokenizer, template, tuple(warnings))


def _spec_from_json(obj: Any, where: str, index: int) -> PromptSpec:
    if not isinstance(obj, dict):
        raise AuditInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    name = str(obj.get("name", f"prompt {index}"))
    kwargs = obj.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise AuditInputError(f"{where}: chat_template_kwargs must be an object")
    if isinstance(obj.get("text"), str) and "messages" not in obj:
        return PromptSpec(name, text=obj["text"])
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return PromptSpec(name, messages=tuple(messages), chat_template_kwargs=kwargs)
    raise AuditInputError(f'{where}: needs "text" (a string) or "messages" (a non-empty list of objects)')


def read_prompts_file(path: Path) -> list[PromptSpec]:
    """The prompts of a JSONL file; a malformed line is an :class:`AuditInputError` naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AuditInputError(f"{path}: prompts file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"{path}: unreadable prompts file ({exc})") from None
    specs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        specs.append(_spec_from_json(obj, f"{path}:{number}", len(specs)))
    if not specs:
        raise AuditInputError(f"{path}: no prompts")
    return specs


def render(spec: PromptSpec, bundle: TokenizerBundle) -> Prompt:
    """The prompt text and token ids; chat messages go through the chat template as transformers renders them."""
    if spec.text is not None:
        text = spec.text
    else:
        reserved = {*RENDERER_ARGUMENTS, *bundle.tokenizer.special_tokens_map}
        clashing = sorted(set(spec.chat_template_kwargs) & reserved)
        if clashing:
            raise AuditInputError(
                f"prompt {spec.name!r}: chat_template_kwargs sets {', '.join(clashing)}, which the renderer sets "
                "itself (the generation prompt and the tokenizer's special tokens)"
            )
        try:
            text = render_chat(
                bundle.template,
                [dict(m) for m in spec.messages],
                source=bundle.template_source,
                add_generation_prompt=True,
                **bundle.tokenizer.special_tokens_map,
                **spec.chat_template_kwargs,
            )
        except ChatTemplateError as exc:
            raise AuditInputError(f"prompt {spec.name!r}: the chat template failed: {exc}") from None
    ids = bundle.tokenizer.encode(text)
    if not ids:
        raise AuditInputError(f"prompt {spec.name!r}: empty after tokenization")
    return Prompt(spec.name, text, tuple(ids))


def render_all(specs: Sequence[PromptSpec], bundle: TokenizerBundle) -> list[Prompt]:
    return [render(spec, bundle) for spec in specs]


def prompts_sha256(prompts: Sequence[Prompt]) -> str:
    return sha256_text(json.dumps([list(p.ids) for p in prompts]))
