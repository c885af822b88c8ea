"""The Qwen tokenizer (byte-level BPE in ``tokenizer.json``), loaded with the ``tokenizers`` library only.

``encode`` adds no special tokens (Qwen has no BOS, and chat prompts carry their own control tokens) and
matches ``transformers``' ``tokenizer(text, add_special_tokens=False)["input_ids"]``; ``decode`` matches
``tokenizer.decode(ids)`` (transformers 5 skips the ``clean_up_tokenization_spaces`` pass for BPE tokenizers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

__all__ = ["QwenTokenizer", "TokenizerLoadError", "load_tokenizer"]

# The named special tokens transformers passes to chat templates (``special_tokens_map``), in its order.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerLoadError(ValueError):
    """``tokenizer.json`` or ``tokenizer_config.json`` is missing or cannot be parsed."""


@dataclass(frozen=True)
class QwenTokenizer:
    """A thin wrapper around a ``tokenizers.Tokenizer`` and the checkpoint's ``tokenizer_config.json``."""

    backend: Tokenizer
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    special_tokens_map: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    chat_template_source: str | None = None  # the file it was read from (for error messages)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added (added tokens in the text still match)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens_map.get("pad_token")
        return None if pad is None else self.token_to_id(pad)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json gives special tokens as strings or as serialized AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template_file(directory: Path) -> Path:
    # transformers prefers a separate chat_template.jinja over the one in tokenizer_config.json.
    jinja_file = directory / "chat_template.jinja"
    return jinja_file if jinja_file.is_file() else directory / "tokenizer_config.json"


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = _chat_template_file(directory)
    if jinja_file.suffix == ".jinja":
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def load_tokenizer(path: str | Path) -> QwenTokenizer:
    """Load ``tokenizer.json`` from a checkpoint directory, or from the path of the file itself.

    A ``tokenizer_config.json`` next to it, if present, supplies the named special tokens
    (``eos_token``, ``pad_token``, ...) and the chat template (also read from ``chat_template.jinja``).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` at ``path``.
        TokenizerLoadError: ``tokenizer.json`` or ``tokenizer_config.json`` cannot be parsed.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No tokenizer.json found at {file}")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerLoadError(f"Cannot parse tokenizer file {file}: {exc}") from exc

    directory = file.parent
    config: dict[str, Any] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerLoadError(f"Cannot parse tokenizer config {config_file}: {exc}") from exc
        if not isinstance(config, dict):
            raise TokenizerLoadError(f"Tokenizer config {config_file} is not a JSON object")

    template = _read_chat_template(directory, config)
    special = {}
    for name in _NAMED_SPECIAL_TOKENS:
        content = _token_content(config.get(name))
        if content is not None:
            special[name] = content
    return QwenTokenizer(
        backend=backend,
        path=file,
        config=config,
        special_tokens_map=special,
        chat_template=template,
        chat_template_source=None if template is None else str(_chat_template_file(directory)),
    )
