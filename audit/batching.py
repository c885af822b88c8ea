"""How the JAX side of the audit batches its greedy replay and teacher forcing: buckets, batches, batch size, and
the count of compiled programs.

The JAX side runs in qwen_jax's batch-invariant mode (``generate``/``forward(..., batch_invariant=True)``): a row's
tokens, logits and hidden states are bitwise the same whatever else is in its batch and however far it is right-
padded. So batching changes the speed of an audit, never its results, and ``--batch-size`` is not part of a run's
contract (a journal resumes under another batch size).

- **Buckets** (:func:`bucket_length`): a prompt is right-padded to the smallest of 64, 128, 192, 256, 384, 512,
  768, 1024, 1536, ... (powers of two and 1.5 times powers of two, from 64) that holds it: at most 1.5x the tokens
  past 128 (2x below), about 1.2x on prompts spread evenly over 100-1,500 tokens, and a number of buckets that
  grows with the log of the longest prompt (16 up to 16k tokens). Every bucket is a multiple of 64.
- **Batches** (:func:`plan_batches`): items are grouped by budget class (new tokens up to 64, 256, 1024, 4096, ...:
  a batch runs until its largest budget, so budgets far apart are not mixed), sorted by prompt length within a
  class (ties: largest budget first, then input order) and cut into the fewest batches of at most ``batch_size``,
  all of one row count (``ceil(n / ceil(n / batch_size))``): a batch short of it is filled with copies of its first
  row, whose outputs are dropped. A batch is right-padded to the bucket of its longest prompt, generates its
  largest budget (each item is cut at its own) and decodes into a state of ``bucket + budget class`` tokens. So
  a budget class compiles at most one prefill and one decode program per bucket. Sorting by length keeps the
  batches full and the padding small (a prompt may sit in a bucket above its own: invariance makes that free of
  consequence for the results).
- **Batch size** (:func:`default_batch_size`): the largest power of two up to :data:`MAX_BATCH` whose rows fit in
  half the free memory once the weights are loaded; a row is its decode state at the longest prompt's bucket plus
  the budget's (:func:`qwen_jax.limits.decode_state_bytes`) and its teacher-forced float32 logits and hidden
  states at that length. Teacher forcing keeps the logits of every position, so at full size (vocabulary 248k) a
  long row is large: :func:`teacher_forced_rows` caps the rows of one teacher-forced batch by the same arithmetic.
- **Compiled programs** (:class:`ProgramCount`): the growth of the compilation caches of qwen_jax's jitted entry
  points (prefill, decode loop, forward) while a part of the audit runs, read from ``jax.jit``'s ``_cache_size()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

#: The smallest bucket (the DeltaNet's chunk length).
MIN_BUCKET = 64
#: The largest default batch.
MAX_BATCH = 16
#: Fraction of the free memory (after the weights) the batched rows may take by default.
MEMORY_FRACTION = 0.5


def bucket_length(n: int) -> int:
    """The padded length of an ``n``-token sequence: the smallest of 64, 128, 192, 256, 384, 512, 768, ... (64,
    then 2^k and 1.5 x 2^k for k >= 7) that is at least ``n``."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    power = 2 * MIN_BUCKET
    while True:
        if n <= power:
            return power
        if n <= power * 3 // 2:
            return power * 3 // 2
        power *= 2


@dataclasses.dataclass(frozen=True)
class Batch:
    """One call of the model: ``indices`` the items in row order; ``rows`` the batch's row count (rows past
    ``len(indices)`` are filler); ``length`` the bucket its rows are right-padded to (``None``: not bucketed);
    ``budget`` the new tokens it generates (the largest of its items'); ``max_length`` its decode state's length
    (``None``: the generator's default)."""

    indices: tuple[int, ...]
    rows: int
    length: int | None
    budget: int
    max_length: int | None


def budget_class(budget: int) -> int:
    """The budget class of ``budget`` new tokens: the smallest of 64, 256, 1024, 4096, ... that holds it."""
    size = MIN_BUCKET
    while size < budget:
        size *= 4
    return size


def _chunks(items: Sequence[int], batch_size: int, equal: bool) -> list[list[int]]:
    """``items`` cut into batches of at most ``batch_size``: in order, or (``equal``) into the fewest batches of
    sizes that differ by at most one, largest first."""
    if not equal:
        return [list(items[k : k + batch_size]) for k in range(0, len(items), batch_size)]
    count = -(-len(items) // batch_size)
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for k in range(count):
        end = start + size + (k < extra)
        out.append(list(items[start:end]))
        start = end
    return out


def plan_batches(
    lengths: Sequence[int],
    budgets: Sequence[int],
    batch_size: int,
    bucket: Callable[[int], int] | None = bucket_length,
) -> list[Batch]:
    """The batches that cover items of token ``lengths`` and new-token ``budgets`` (see the module docstring).

    With ``bucket=None``: batches of at most ``batch_size`` items that share one budget, each budget's items in
    input order, budgets in order of first appearance; no padding rows, no bucket (what a generator that pads by
    itself needs). Raises ``ValueError`` on a batch size below 1 or mismatched inputs."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if len(lengths) != len(budgets):
        raise ValueError(f"{len(lengths)} lengths for {len(budgets)} budgets")
    groups: dict[int, list[int]] = {}
    for index in range(len(lengths)):
        key = budgets[index] if bucket is None else budget_class(budgets[index])
        groups.setdefault(key, []).append(index)
    batches = []
    for members in groups.values():
        if bucket is None:
            batches += [
                Batch(tuple(c), len(c), None, budgets[c[0]], None)
                for c in _chunks(members, batch_size, False)
            ]
            continue
        members = sorted(members, key=lambda i: (lengths[i], -budgets[i], i))
        chunks = _chunks(members, batch_size, equal=True)
        rows = max(len(c) for c in chunks)
        for chunk in chunks:
            length = bucket(max(lengths[i] for i in chunk))
            budget = max(budgets[i] for i in chunk)
            batches.append(Batch(tuple(chunk), rows, length, budget, length + budget_class(budget)))
    return batches


def buckets_of(batches: Sequence[Batch]) -> list[tuple[int, int]]:
    """The distinct (bucket, decode-state length) pairs of ``batches``, sorted: at most one prefill and one decode
    program each (one budget class: one row count)."""
    return sorted({(b.length, b.max_length) for b in batches if b.length is not None})


# ----------------------------------------------------------------------------------------------------
# Memory.


def teacher_forced_row_bytes(cfg, length: int) -> int:
    """Bytes of one teacher-forced row of ``length`` tokens as the audit keeps it: float32 logits and every hidden
    state (the embeddings and each layer's output)."""
    return length * (cfg.vocab_size + (cfg.num_hidden_layers + 1) * cfg.hidden_size) * 4


def row_bytes(cfg, dtype, prompt_tokens: int, new_tokens: int) -> int:
    """The memory one batch row takes at most: its decode state and its teacher-forced outputs."""
    from qwen_jax.limits import decode_state_bytes

    length = bucket_length(prompt_tokens)
    decode = decode_state_bytes(cfg, 1, length + budget_class(new_tokens), dtype)
    return decode + teacher_forced_row_bytes(cfg, bucket_length(prompt_tokens + new_tokens))


def default_batch_size(
    cfg, dtype, prompt_tokens: int, new_tokens: int, weights_bytes: int, free_bytes: int | None
) -> int:
    """The largest power of two up to :data:`MAX_BATCH` whose rows (:func:`row_bytes` at the longest prompt) fit in
    :data:`MEMORY_FRACTION` of the memory left after the weights; 1 when even one does not (the preflight then
    says so); :data:`MAX_BATCH` when the free memory is unknown."""
    if free_bytes is None:
        return MAX_BATCH
    room = (free_bytes - weights_bytes) * MEMORY_FRACTION
    per_row = row_bytes(cfg, dtype, prompt_tokens, new_tokens)
    size = MAX_BATCH
    while size > 1 and size * per_row > room:
        size //= 2
    return size


def teacher_forced_rows(cfg, batch_rows: int, length: int, budget_bytes: int) -> int:
    """Rows of one teacher-forced batch of ``length`` (padded) tokens: ``batch_rows``, or fewer when their outputs
    would exceed ``budget_bytes`` (at least 1)."""
    return max(1, min(batch_rows, budget_bytes // max(1, teacher_forced_row_bytes(cfg, length))))


# ----------------------------------------------------------------------------------------------------
# Compiled programs.


def _jitted_entry_points() -> dict[str, object]:
    """The jitted functions of every loaded qwen_jax module (prefill, decode loop, forward, ...): those with a
    compilation cache."""
    import importlib
    import sys

    for name in ("qwen_jax.model", "qwen_jax.generate"):  # the entry points (qwen_jax imports them lazily)
        importlib.import_module(name)
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "qwen_jax" or module_name.startswith("qwen_jax.")):
            continue
        for name, value in vars(module).items():
            if callable(getattr(value, "_cache_size", None)):
                found.setdefault(f"{getattr(value, '__module__', module_name)}.{name}", value)
    return found


class ProgramCount:
    """Programs compiled by qwen_jax's jitted entry points while in use: ``with ProgramCount() as count: ...``,
    then ``count.programs`` ({entry point: programs compiled inside the block}, zeros left out) and
    ``count.total``. A program compiled before the block (an earlier call with the same shapes) is not counted."""

    def __init__(self) -> None:
        self.programs: dict[str, int] = {}

    def __enter__(self) -> ProgramCount:
        self._functions = _jitted_entry_points()
        self._before = {name: f._cache_size() for name, f in self._functions.items()}
        return self

    def __exit__(self, *exc) -> None:
        grown = {name: f._cache_size() - self._before[name] for name, f in self._functions.items()}
        self.programs = {name: n for name, n in sorted(grown.items()) if n}

    @property
    def total(self) -> int:
        return sum(self.programs.values())


def describe(
    batch_size: int, greedy: Sequence[Batch], forced: Sequence[Batch], programs: ProgramCount
) -> dict:
    """The batching summary the report keeps (``manifest.jax.batching``)."""
    return {
        "batch_size": batch_size,
        "bucket_scheme": "64, then 2^k and 1.5 x 2^k tokens (k >= 7), right-padded",
        "greedy_batches": len(greedy),
        "greedy_buckets": [list(b) for b in buckets_of(greedy)],
        "teacher_forced_batches": len(forced),
        "teacher_forced_buckets": sorted({b.length for b in forced if b.length is not None}),
        "compiled_programs": dict(programs.programs),
        "compiled_programs_total": programs.total,
    }
