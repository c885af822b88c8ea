"""The command-line contract shared by ``python -m audit``, ``python -m conversion`` and ``python -m qwen_jax``.

Exit codes:

- 0: success (the audit: the two implementations agree);
- 1: a finding (the audit: they diverge; ``conversion verify``: a leaf or a source file does not match);
- 2: bad input: one line on stderr, ``error: ...``, naming the problem and the file, tensor or argument;
- 3: an unexpected internal error (a bug): one line on stderr saying so, with the traceback written to a log file
  whose path that line gives (the report directory when there is one, else a temporary file);
- 130: interrupted (Ctrl-C).

Nothing else reaches the user as a traceback. This module imports no jax, torch or transformers, so that bad
arguments and bad output paths are answered before any of them loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
INTERNAL_LOG = "internal-error.log"


class BadInputError(ValueError):
    """Bad input found by a check shared by the CLIs (an output path, a limit); one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: PROG: MESSAGE``) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: a multi-line message (a list of problems) keeps its first lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    shown = " ".join(lines[:2])
    return shown if len(lines) <= 2 else f"{shown} (and {len(lines) - 2} more)"


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` if a directory can be written there: not an existing file, not under a file, and its nearest
    existing ancestor writable. Checked before any work, so that a run never ends unable to save its results."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{flag} {path}: exists and is not a directory")
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInputError(f"{flag} {path}: {ancestor} is not writable")
    return path


def write_internal_log(log_dir: Path | None) -> Path:
    """The current exception's traceback in ``log_dir/internal-error.log``, or a temporary file when there is no
    such directory or it cannot be written."""
    text = traceback.format_exc()
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / INTERNAL_LOG
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="qwen-jax-internal-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(name)


#: The project's input-error classes, by name: catching them never imports their (heavy) modules, since an
#: instance can only exist once its module is loaded.
PROJECT_INPUT_ERRORS = (
    "qwen_jax.safetensors_io:CheckpointError",
    "qwen_jax.config:ConfigError",
    "qwen_jax.tokenizer:TokenizerLoadError",
    "qwen_jax.chat:ChatTemplateError",
)


def is_instance_of_any(exc: BaseException, classes: Sequence[type | str]) -> bool:
    """isinstance against classes given as types or as ``"module:Class"`` names (unloaded modules: no match)."""
    for cls in classes:
        if isinstance(cls, str):
            module, _, name = cls.partition(":")
            cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def run_guarded(
    body: Callable[[], int],
    bad_input: Sequence[type | str] = (),
    log_dir: Path | None = None,
) -> int:
    """Runs a CLI's work under the contract above: :class:`BadInputError`, :data:`PROJECT_INPUT_ERRORS` and
    ``bad_input`` (types or ``"module:Class"`` names) are one line and exit 2; anything unexpected is one line,
    its traceback in a log file (in ``log_dir`` when given), and exit 3."""
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the contract: no traceback reaches the user
        if is_instance_of_any(exc, (BadInputError, *PROJECT_INPUT_ERRORS, *bad_input)):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        log = write_internal_log(log_dir)
        print(
            f"internal error (a bug, not a problem with your input): {type(exc).__name__}: {one_line(exc)}; "
            f"the traceback is in {log}",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
