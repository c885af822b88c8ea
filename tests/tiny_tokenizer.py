"""The tests' tokenizer builder: :mod:`audit.tiny_tokenizer`."""

from audit.tiny_tokenizer import CONTROL, QWEN_SPLIT, SPECIAL, build_tokenizer_dir  # noqa: F401
