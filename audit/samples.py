"""Typed reading of lm-evaluation-harness ``--log_samples`` files and of MERA Industrial submission zips.

Pure Python (no JAX/torch). The formats are those of lm-eval 0.4.9.1 (the version MERA_Industrial pins)
run with ``--model local-chat-completions --apply_chat_template --log_samples`` (``shared/spec/audit.md``
§2.2, §2.3):

* ``samples_<task>_<date>.jsonl``: one JSON object per document, with the keys ``doc_id``, ``doc`` (the row
  as ``datasets`` loaded it), ``target`` (``str(doc_to_target(doc))``), ``arguments`` (``{"gen_args_0":
  {"arg_0": [<messages JSON string>], "arg_1": {<gen_kwargs>}}}``), ``resps`` (``[[<reply>]]``, every value
  passed through ``str()``, so a null reply is the string ``"None"``), ``filtered_resps`` (``[<filtered
  reply>]`` after MERA's ``remove_whitespace_and_nones`` and ``take_first``), ``filter``, ``metrics`` (the
  names of the per-document metric values that follow, ``["em", "f1"]`` or ``["bypass"]`` under
  ``--predict_only``), ``doc_hash``, ``prompt_hash``, ``target_hash``, then the metric values themselves.
  ``<date>`` is ``datetime.now().isoformat()`` with ``:`` replaced by ``-``.
* ``submission.zip`` from MERA's ``scripts/log_to_submission.py``: one ``<dst_name>.json`` per task
  (:data:`TASK_TO_SUBMISSION_NAME`) of the form ``{"data": {"test": [{"outputs": filtered_resps[0],
  "meta": {"id": doc["meta"]["id"]}}, ...]}}``, built from the NEWEST ``samples_<task>_*.json*`` by the date
  in its name, and ``logs_public.zip`` holding every ``samples_*``/``results_*`` file of the output folder.
  The zip that gets scored is therefore exactly the ``filtered_resps`` strings.

Malformed input raises :class:`SamplesError`, a ``ValueError`` whose one-line message starts with the file
(and, for a JSONL file, the line number): ``samples_med_bench_....jsonl:3: missing field 'prompt_hash'``.
Records are frozen dataclasses; their dict-valued fields (``doc``, ``gen_kwargs``, ...) hold the parsed JSON
as is and must be treated as read-only.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "LOGS_ZIP_NAME",
    "NULL_REPLY",
    "SUBMISSION_NAME_TO_TASK",
    "TASK_TO_SUBMISSION_NAME",
    "LogsBundle",
    "MismatchKind",
    "OutputMismatch",
    "Request",
    "Sample",
    "SamplesError",
    "SamplesFile",
    "Submission",
    "SubmissionEntry",
    "chat_prompt_json",
    "check_submission_outputs",
    "doc_hash",
    "hash_string",
    "mera_doc_to_text",
    "parse_samples_filename",
    "parse_samples_lines",
    "prompt_hash",
    "read_logs_zip",
    "read_samples",
    "read_submission",
    "target_hash",
    "task_hash",
]

# MERA's log_to_submission.py: lm-eval task name -> submission file stem (``<dst_name>.json``).
TASK_TO_SUBMISSION_NAME: Mapping[str, str] = {
    "agro_bench": "ruTXTAgroBench",
    "aqua_bench": "ruTXTAquaBench",
    "med_bench": "ruTXTMedQFundamental",
}
SUBMISSION_NAME_TO_TASK: Mapping[str, str] = {v: k for k, v in TASK_TO_SUBMISSION_NAME.items()}
LOGS_ZIP_NAME = "logs_public.zip"

# lm-eval logs ``str(reply)``: a reply whose chat ``content`` was null is logged as this string.
NULL_REPLY = "None"

# The keys every lm-eval 0.4.9.1 sample record carries (the metric values are checked through ``metrics``).
REQUIRED_FIELDS = (
    "doc_id",
    "doc",
    "target",
    "arguments",
    "resps",
    "filtered_resps",
    "filter",
    "metrics",
    "doc_hash",
    "prompt_hash",
    "target_hash",
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# ``samples_<task>_<date>.jsonl``; MERA globs ``samples_<task>_*.json*``. The fraction is absent when
# ``datetime.now()`` happened to fall on a whole second (``isoformat()`` then omits it).
_SAMPLES_NAME = re.compile(
    r"samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,6})?)\.jsonl?"
)
_RESULTS_NAME = re.compile(r"results_.*\.json")


class SamplesError(ValueError):
    """Malformed samples / submission input; the one-line message names the file and line (or entry)."""


# ----------------------------------------------------------------------------------------------------
# Hashes, exactly as lm-eval computes them.


def hash_string(text: str) -> str:
    """lm-eval's ``lm_eval.utils.hash_string``: the sha256 hex digest of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hash(text: str) -> str:
    """The ``prompt_hash`` lm-eval logs for a request whose first argument is ``text``.

    For ``local-chat-completions`` the argument is a ``JsonChatStr`` whose ``encode`` encodes its JSON string,
    so this is sha256 of the messages JSON string in ``arguments.gen_args_0.arg_0[0]`` (see
    :func:`chat_prompt_json`), NOT of the rendered chat template.
    """
    return hash_string(text)


def doc_hash(doc: Mapping[str, Any]) -> str:
    """``sha256(json.dumps(doc, indent=2, ensure_ascii=False))`` as lm-eval logs it.

    ``doc`` must keep the key order of the row as ``datasets`` loaded it (the logged ``doc`` does, and
    ``json.loads`` preserves it). lm-eval passes ``default=handle_non_serializable``; a doc read back from
    JSON holds only JSON types, for which that default is never called.
    """
    return hash_string(json.dumps(doc, indent=2, ensure_ascii=False))


def target_hash(target: Any) -> str:
    """``sha256(str(target))`` as lm-eval logs it."""
    return hash_string(str(target))


def task_hash(samples: Iterable[Sample]) -> str:
    """``results_*.json`` ``task_hashes[task]``: sha256 of the concatenated ``doc_hash + prompt_hash +
    target_hash`` of the samples, in the order given (the logged file order)."""
    return hash_string("".join(s.doc_hash + s.prompt_hash + s.target_hash for s in samples))


def chat_prompt_json(user_text: str, system_instruction: str | None = None) -> str:
    """The messages JSON string lm-eval 0.4.9.1 sends (and logs as ``arg_0[0]``) for one zero-shot doc.

    ``TemplateAPI.apply_chat_template`` without a client tokenizer returns
    ``JsonChatStr(json.dumps([{**m, "type": "text"} for m in chat_history], ensure_ascii=False))`` with the
    default separators; the chat history is ``[{"role": "user", "content": doc_to_text(doc)}]``, preceded by a
    system message when ``--system_instruction`` is given.
    """
    history = [] if system_instruction is None else [{"role": "system", "content": system_instruction}]
    history.append({"role": "user", "content": user_text})
    return json.dumps([{**m, "type": "text"} for m in history], ensure_ascii=False)


def mera_doc_to_text(task: str, doc: Mapping[str, Any]) -> str:
    """The prompt text MERA Industrial builds for ``doc`` (audit.md §1.2).

    * ``med_bench``: ``{{ instruction.format(**inputs).strip() }}`` (a Jinja template calling ``str.format``).
    * ``agro_bench``, ``aqua_bench``: ``instruction.format(**inputs, **meta)``, NOT stripped; a key present in
      both ``inputs`` and ``meta`` raises ``TypeError`` there and :class:`SamplesError` here. Options absent
      from a row are ``None`` after ``datasets`` unified the schema and would format as ``"None"``.
    """
    try:
        instruction = doc["instruction"]
        inputs = doc["inputs"]
        if task == "med_bench":
            return instruction.format(**inputs).strip()
        if task in ("agro_bench", "aqua_bench"):
            meta = doc["meta"]
            overlap = sorted(set(inputs) & set(meta))
            if overlap:
                raise SamplesError(f"{task}: keys {overlap} are in both inputs and meta")
            return instruction.format(**inputs, **meta)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        if isinstance(err, SamplesError):
            raise
        raise SamplesError(f"{task}: cannot build the prompt: {type(err).__name__}: {err}") from None
    raise SamplesError(
        f"{task}: not a MERA Industrial task (expected one of {sorted(TASK_TO_SUBMISSION_NAME)})"
    )


# ----------------------------------------------------------------------------------------------------
# Records.


@dataclass(frozen=True)
class Request:
    """One request of a sample: ``arguments["gen_args_<i>"]``.

    ``prompt`` is ``arg_0`` unwrapped: lm-eval serialises a ``JsonChatStr`` (a NamedTuple) as a one-element
    list, a plain string prompt as a string (``prompt_in_list`` says which); ``gen_kwargs`` is ``arg_1``.
    """

    prompt: str
    prompt_in_list: bool
    gen_kwargs: Mapping[str, Any]
    origin: str = field(default="", compare=False)

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages: ``json.loads(prompt)`` (a fresh list on each call)."""
        try:
            messages = json.loads(self.prompt)
        except json.JSONDecodeError as err:
            raise SamplesError(f"{self.origin}: arg_0 is not a JSON chat: {err.msg}") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise SamplesError(f"{self.origin}: arg_0 is not a JSON list of chat messages")
        return messages


@dataclass(frozen=True)
class Sample:
    """One line of a ``samples_<task>_<date>.jsonl`` file."""

    source: str  # the file, as named in error messages
    line: int  # 1-based line number in ``source``
    task: str
    doc_id: int
    doc: Mapping[str, Any]
    target: str
    requests: tuple[Request, ...]
    resps: tuple[tuple[str, ...], ...]
    filtered_resps: tuple[str, ...]
    filter: str
    metrics: tuple[str, ...]
    metric_values: Mapping[str, Any]  # the per-doc values named in ``metrics`` (``em``/``f1``, or ``bypass``)
    doc_hash: str
    prompt_hash: str
    target_hash: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # any other keys, as logged

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def meta_id(self) -> int | None:
        """``doc["meta"]["id"]``, the id MERA's submission uses (numbered through test and shots together)."""
        meta = self.doc.get("meta")
        value = meta.get("id") if isinstance(meta, Mapping) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def gold(self) -> str:
        """``doc["outputs"]``, what MERA's ``process_results`` scores against (``""`` on the private test)."""
        value = self.doc.get("outputs")
        if not isinstance(value, str):
            raise SamplesError(f"{self.where}: doc.outputs is {type(value).__name__}, not a string")
        return value

    @property
    def prompt(self) -> str:
        """The first request's messages JSON string (what ``prompt_hash`` hashes)."""
        return self.requests[0].prompt

    @property
    def gen_kwargs(self) -> Mapping[str, Any]:
        return self.requests[0].gen_kwargs

    def messages(self) -> list[dict[str, Any]]:
        return self.requests[0].messages()

    def user_text(self) -> str:
        """The content of the last user message: ``doc_to_text(doc)`` for these zero-shot tasks."""
        for message in reversed(self.messages()):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
        raise SamplesError(f"{self.where}: no user message with string content in arg_0")

    @property
    def response(self) -> str:
        """``resps[0][0]``: the reply as logged (``"None"`` when the chat content was null)."""
        return self.resps[0][0]

    @property
    def filtered_response(self) -> str:
        """``filtered_resps[0]``: the scored reply, and what the submission's ``outputs`` must equal."""
        return self.filtered_resps[0]

    @property
    def content_was_null(self) -> bool:
        """True when the server returned null content: logged ``"None"`` that the filter turned into ``""``.

        (A model that literally answered ``None`` keeps ``"None"`` after the filter, so this is unambiguous.)
        """
        return self.response == NULL_REPLY and self.filtered_response == ""

    def hash_mismatches(self) -> tuple[str, ...]:
        """Names of the logged hashes that do not match a recomputation (empty when all match)."""
        bad = []
        if doc_hash(self.doc) != self.doc_hash:
            bad.append("doc_hash")
        if prompt_hash(self.prompt) != self.prompt_hash:
            bad.append("prompt_hash")
        if target_hash(self.target) != self.target_hash:
            bad.append("target_hash")
        return tuple(bad)


@dataclass(frozen=True)
class SamplesFile:
    """A parsed samples file. ``date`` is the ``<date>`` part of its name ("" when not taken from a name)."""

    source: str
    task: str
    date: str
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def timestamp(self) -> datetime | None:
        return _parse_date(self.date) if self.date else None

    def by_doc_id(self) -> dict[int, Sample]:
        return {s.doc_id: s for s in self.samples}

    def by_meta_id(self) -> dict[int, Sample]:
        """Samples keyed by ``doc.meta.id``; a missing or duplicated id raises :class:`SamplesError`."""
        out: dict[int, Sample] = {}
        for s in self.samples:
            mid = s.meta_id
            if mid is None:
                raise SamplesError(f"{s.where}: doc.meta.id is missing or not an integer")
            if mid in out:
                raise SamplesError(f"{s.where}: duplicate doc.meta.id {mid} (first on line {out[mid].line})")
            out[mid] = s
        return out


# ----------------------------------------------------------------------------------------------------
# Parsing samples files.


def _parse_date(date: str) -> datetime:
    for fmt in ("%Y-%m-%dT%H-%M-%S.%f", "%Y-%m-%dT%H-%M-%S"):
        try:
            return datetime.strptime(date, fmt)
        except ValueError:
            pass
    raise SamplesError(f"{date!r}: not an lm-eval date (YYYY-MM-DDTHH-MM-SS.ffffff)")


def parse_samples_filename(name: str) -> tuple[str, str]:
    """``(task, date)`` from ``.../samples_<task>_<date>.jsonl`` (the task may contain underscores)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    match = _SAMPLES_NAME.fullmatch(base)
    if match is None:
        raise SamplesError(f"{name}: not a samples_<task>_<date>.jsonl file name")
    _parse_date(match["date"])
    return match["task"], match["date"]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(where: str, message: str) -> SamplesError:
    return SamplesError(f"{where}: {message}")


def _parse_requests(arguments: Any, where: str) -> tuple[Request, ...]:
    if not isinstance(arguments, dict) or not arguments:
        raise _fail(where, f"field 'arguments' must be a non-empty object, got {_type_name(arguments)}")
    requests = []
    for i in range(len(arguments)):
        key = f"gen_args_{i}"
        entry = arguments.get(key)
        if not isinstance(entry, dict):
            got = "missing" if entry is None else _type_name(entry)
            raise _fail(where, f"arguments.{key} must be an object ({got}; keys are {sorted(arguments)})")
        if "arg_0" not in entry:
            raise _fail(where, f"missing field 'arguments.{key}.arg_0'")
        if "arg_1" not in entry:
            raise _fail(where, f"missing field 'arguments.{key}.arg_1'")
        arg0, gen_kwargs = entry["arg_0"], entry["arg_1"]
        if isinstance(arg0, str):
            prompt, in_list = arg0, False
        elif isinstance(arg0, list) and len(arg0) == 1 and isinstance(arg0[0], str):
            prompt, in_list = arg0[0], True
        else:
            raise _fail(where, f"arguments.{key}.arg_0 must be a string or a one-string list")
        if not isinstance(gen_kwargs, dict):
            raise _fail(where, f"arguments.{key}.arg_1 must be an object, got {_type_name(gen_kwargs)}")
        requests.append(Request(prompt=prompt, prompt_in_list=in_list, gen_kwargs=gen_kwargs, origin=where))
    return tuple(requests)


def _parse_record(obj: Any, *, source: str, line: int, task: str) -> Sample:
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {_type_name(obj)}")
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise _fail(where, f"missing field {key!r}")

    doc_id, doc, target = obj["doc_id"], obj["doc"], obj["target"]
    if not _is_int(doc_id):
        raise _fail(where, f"field 'doc_id' must be an integer, got {_type_name(doc_id)}")
    if not isinstance(doc, dict):
        raise _fail(where, f"field 'doc' must be an object, got {_type_name(doc)}")
    if not isinstance(target, str):
        raise _fail(where, f"field 'target' must be a string, got {_type_name(target)}")

    requests = _parse_requests(obj["arguments"], where)

    resps = obj["resps"]
    if not isinstance(resps, list) or not resps:
        raise _fail(where, f"field 'resps' must be a non-empty list, got {_type_name(resps)}")
    for i, per_request in enumerate(resps):
        if not isinstance(per_request, list) or not per_request:
            raise _fail(where, f"resps[{i}] must be a non-empty list of strings")
        for j, reply in enumerate(per_request):
            if not isinstance(reply, str):
                raise _fail(where, f"resps[{i}][{j}] must be a string, got {_type_name(reply)}")
    filtered = obj["filtered_resps"]
    if not isinstance(filtered, list) or not filtered:
        raise _fail(where, f"field 'filtered_resps' must be a non-empty list, got {_type_name(filtered)}")
    for i, reply in enumerate(filtered):
        if not isinstance(reply, str):
            raise _fail(where, f"filtered_resps[{i}] must be a string (take_first), got {_type_name(reply)}")
    if not len(requests) == len(resps) == len(filtered):
        raise _fail(
            where,
            f"{len(requests)} requests but {len(resps)} resps and {len(filtered)} filtered_resps",
        )

    filter_name, metrics = obj["filter"], obj["metrics"]
    if not isinstance(filter_name, str):
        raise _fail(where, f"field 'filter' must be a string, got {_type_name(filter_name)}")
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _fail(where, "field 'metrics' must be a list of strings")
    for name in metrics:
        if name not in obj:
            raise _fail(where, f"missing field {name!r} (listed in 'metrics')")

    hashes = {}
    for key in ("doc_hash", "prompt_hash", "target_hash"):
        value = obj[key]
        if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
            raise _fail(where, f"field {key!r} is not a sha256 hex digest")
        hashes[key] = value

    known = set(REQUIRED_FIELDS) | set(metrics)
    return Sample(
        source=source,
        line=line,
        task=task,
        doc_id=doc_id,
        doc=doc,
        target=target,
        requests=requests,
        resps=tuple(tuple(r) for r in resps),
        filtered_resps=tuple(filtered),
        filter=filter_name,
        metrics=tuple(metrics),
        metric_values={name: obj[name] for name in metrics},
        extra={k: v for k, v in obj.items() if k not in known},
        **hashes,
    )


def parse_samples_lines(lines: Iterable[str | bytes], *, source: str, task: str) -> tuple[Sample, ...]:
    """Parse JSONL lines (numbered from 1) into samples. Whitespace-only lines are skipped.

    Pass lines split on ``"\\n"`` only: ``str.splitlines`` also splits on U+2028 and other separators
    that ``json.dumps(..., ensure_ascii=False)`` leaves unescaped inside strings. A duplicated ``doc_id`` is
    an error.
    """
    samples: list[Sample] = []
    first_line: dict[int, int] = {}
    for line_no, raw in enumerate(lines, start=1):
        where = f"{source}:{line_no}"
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _fail(where, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(where, f"invalid JSON: {err.msg} at column {err.colno}") from None
        sample = _parse_record(obj, source=source, line=line_no, task=task)
        if sample.doc_id in first_line:
            raise _fail(
                where, f"duplicate doc_id {sample.doc_id} (first on line {first_line[sample.doc_id]})"
            )
        first_line[sample.doc_id] = line_no
        samples.append(sample)
    return tuple(samples)


def _samples_from_bytes(data: bytes, *, source: str, name: str, task: str | None) -> SamplesFile:
    try:
        name_task, date = parse_samples_filename(name)
    except SamplesError:
        if task is None:
            raise
        name_task, date = task, ""
    task = task or name_task
    samples = parse_samples_lines(data.split(b"\n"), source=source, task=task)
    return SamplesFile(source=source, task=task, date=date, samples=samples)


def read_samples(path: str | Path, task: str | None = None) -> SamplesFile:
    """Read one ``samples_<task>_<date>.jsonl`` file. ``task`` overrides the task taken from the file name
    (and allows a file whose name does not follow lm-eval's pattern)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SamplesError(f"{path}: cannot read: {err.strerror or err}") from None
    return _samples_from_bytes(data, source=str(path), name=path.name, task=task)


# ----------------------------------------------------------------------------------------------------
# MERA submission zips.


@dataclass(frozen=True)
class SubmissionEntry:
    """One ``data.test[i]`` of a ``<dst_name>.json``: ``outputs`` as stored (a string when well formed)."""

    meta_id: int
    outputs: Any
    index: int  # position in ``data.test``


@dataclass(frozen=True)
class LogsBundle:
    """The contents of ``logs_public.zip``.

    ``samples`` holds, per task, the samples file ``log_to_submission.py`` would have used: the newest by the
    date in its name. ``superseded`` lists the other (older) samples files of each task, which the submission
    did not use; ``results`` maps each ``results_*.json`` member name to its parsed JSON.
    """

    source: str
    samples: Mapping[str, SamplesFile]
    superseded: Mapping[str, tuple[str, ...]]
    results: Mapping[str, Any]


@dataclass(frozen=True)
class Submission:
    """A MERA ``submission.zip``: the scored outputs per task (keyed by lm-eval task name when known, else by
    the file stem) and the public logs they were made from."""

    source: str
    outputs: Mapping[str, tuple[SubmissionEntry, ...]]
    logs: LogsBundle


def _member_name(source: str, member: str) -> str:
    return f"{source}!{member}"


def _read_zip(data: bytes | str | Path, source: str) -> zipfile.ZipFile:
    try:
        if isinstance(data, bytes):
            return zipfile.ZipFile(io.BytesIO(data))
        return zipfile.ZipFile(data)
    except (OSError, zipfile.BadZipFile) as err:
        raise SamplesError(f"{source}: not a readable zip file ({err})") from None


def read_logs_zip(data: bytes | str | Path, source: str | None = None) -> LogsBundle:
    """Read a ``logs_public.zip`` (a path, or its bytes with ``source`` naming it in messages).

    Members other than ``samples_*``/``results_*`` JSON files are ignored; members are matched by base name
    (``log_to_submission.py`` writes them flat). A ``samples_*`` name that does not parse is an error, as
    it is for MERA's script, which sorts the files by the date in their names.
    """
    source = source or str(data if not isinstance(data, bytes) else LOGS_ZIP_NAME)
    by_task: dict[str, list[tuple[datetime, str, bytes]]] = {}
    results: dict[str, Any] = {}
    with _read_zip(data, source) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            base = PurePosixPath(info.filename).name.lower()
            if base.startswith("samples_"):
                task, date = parse_samples_filename(info.filename)
                by_task.setdefault(task, []).append((_parse_date(date), info.filename, zf.read(info)))
            elif _RESULTS_NAME.fullmatch(base):
                where = _member_name(source, info.filename)
                try:
                    results[info.filename] = json.loads(zf.read(info).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise SamplesError(f"{where}: invalid JSON ({err})") from None
    samples: dict[str, SamplesFile] = {}
    superseded: dict[str, tuple[str, ...]] = {}
    for task, files in sorted(by_task.items()):
        files.sort(key=lambda f: (f[0], f[1]), reverse=True)
        _, name, raw = files[0]
        samples[task] = _samples_from_bytes(raw, source=_member_name(source, name), name=name, task=task)
        superseded[task] = tuple(f[1] for f in files[1:])
    return LogsBundle(source=source, samples=samples, superseded=superseded, results=results)


def _parse_submission_json(raw: bytes, where: str) -> tuple[SubmissionEntry, ...]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamplesError(f"{where}: invalid JSON ({err})") from None
    test = (
        obj.get("data", {}).get("test")
        if isinstance(obj, dict) and isinstance(obj.get("data"), dict)
        else None
    )
    if not isinstance(test, list):
        raise SamplesError(f'{where}: expected {{"data": {{"test": [...]}}}}')
    entries = []
    for i, item in enumerate(test):
        if not isinstance(item, dict):
            raise SamplesError(f"{where}: data.test[{i}] must be an object, got {_type_name(item)}")
        if "outputs" not in item:
            raise SamplesError(f"{where}: data.test[{i}]: missing field 'outputs'")
        meta = item.get("meta")
        mid = meta.get("id") if isinstance(meta, dict) else None
        if not _is_int(mid):
            raise SamplesError(f"{where}: data.test[{i}]: missing or non-integer 'meta.id'")
        entries.append(SubmissionEntry(meta_id=mid, outputs=item["outputs"], index=i))
    return tuple(entries)


def read_submission(path: str | Path) -> Submission:
    """Read a MERA ``submission.zip``: ``<dst_name>.json`` outputs and the nested ``logs_public.zip``.

    Members are matched by base name, so a zip whose files sit in one folder also reads.
    """
    source = str(path)
    outputs: dict[str, tuple[SubmissionEntry, ...]] = {}
    logs_member: str | None = None
    logs_bytes = b""
    with _read_zip(Path(path), source) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            base = PurePosixPath(info.filename).name
            if base == LOGS_ZIP_NAME:
                if logs_member is not None:
                    raise SamplesError(
                        f"{source}: two {LOGS_ZIP_NAME} members: {logs_member}, {info.filename}"
                    )
                logs_member = info.filename
                logs_bytes = zf.read(info)
            elif base.endswith(".json"):
                stem = base[: -len(".json")]
                key = SUBMISSION_NAME_TO_TASK.get(stem, stem)
                if key in outputs:
                    raise SamplesError(f"{source}: two output files for {stem}")
                outputs[key] = _parse_submission_json(zf.read(info), _member_name(source, info.filename))
    if logs_member is None:
        raise SamplesError(f"{source}: no {LOGS_ZIP_NAME} inside")
    logs = read_logs_zip(logs_bytes, source=_member_name(source, logs_member))
    return Submission(source=source, outputs=outputs, logs=logs)


class MismatchKind(enum.StrEnum):
    DIFFERS = "differs"  # submission outputs != logged filtered_resps[0]
    MISSING_FROM_SUBMISSION = "missing_from_submission"  # a logged doc has no submission entry
    NOT_IN_LOGS = "not_in_logs"  # a submission entry whose meta.id no logged doc has
    DUPLICATE_IN_SUBMISSION = "duplicate_in_submission"  # meta.id repeated in the submission file
    DUPLICATE_IN_LOGS = "duplicate_in_logs"  # meta.id repeated in the samples file
    TASK_MISSING_FROM_SUBMISSION = "task_missing_from_submission"  # logs have the task, submission does not
    TASK_MISSING_FROM_LOGS = "task_missing_from_logs"  # submission has the task, logs do not


@dataclass(frozen=True)
class OutputMismatch:
    task: str
    kind: MismatchKind
    meta_id: int | None = None
    submitted: Any = None
    logged: str | None = None

    def describe(self) -> str:
        head = f"{self.task}" + ("" if self.meta_id is None else f" meta.id={self.meta_id}")
        if self.kind is MismatchKind.DIFFERS:
            return (
                f"{head}: submission outputs {self.submitted!r} != logged filtered_resps[0] {self.logged!r}"
            )
        return f"{head}: {self.kind.value.replace('_', ' ')}"


def check_submission_outputs(submission: Submission) -> tuple[OutputMismatch, ...]:
    """Check that every submission ``outputs`` equals its doc's logged ``filtered_resps[0]`` (exact string
    equality), matching entries by ``doc.meta.id`` as ``log_to_submission.py`` wrote them. Returns the
    mismatches (empty when the submission is exactly the logs), ordered by task then meta.id."""
    problems: list[OutputMismatch] = []
    tasks = sorted(set(submission.outputs) | set(submission.logs.samples))
    for task in tasks:
        if task not in submission.outputs:
            problems.append(OutputMismatch(task, MismatchKind.TASK_MISSING_FROM_SUBMISSION))
            continue
        if task not in submission.logs.samples:
            problems.append(OutputMismatch(task, MismatchKind.TASK_MISSING_FROM_LOGS))
            continue
        logged: dict[int, Sample] = {}
        task_problems: list[OutputMismatch] = []
        for s in submission.logs.samples[task]:
            mid = s.meta_id
            if mid is None:
                raise SamplesError(f"{s.where}: doc.meta.id is missing or not an integer")
            if mid in logged:
                task_problems.append(OutputMismatch(task, MismatchKind.DUPLICATE_IN_LOGS, mid))
                continue
            logged[mid] = s
        seen: set[int] = set()
        for entry in submission.outputs[task]:
            mid = entry.meta_id
            if mid in seen:
                task_problems.append(
                    OutputMismatch(task, MismatchKind.DUPLICATE_IN_SUBMISSION, mid, submitted=entry.outputs)
                )
                continue
            seen.add(mid)
            sample = logged.get(mid)
            if sample is None:
                task_problems.append(
                    OutputMismatch(task, MismatchKind.NOT_IN_LOGS, mid, submitted=entry.outputs)
                )
            elif entry.outputs != sample.filtered_response or not isinstance(entry.outputs, str):
                task_problems.append(
                    OutputMismatch(
                        task,
                        MismatchKind.DIFFERS,
                        mid,
                        submitted=entry.outputs,
                        logged=sample.filtered_response,
                    )
                )
        for mid in sorted(set(logged) - seen):
            task_problems.append(
                OutputMismatch(
                    task, MismatchKind.MISSING_FROM_SUBMISSION, mid, logged=logged[mid].filtered_response
                )
            )
        task_problems.sort(key=lambda p: (p.meta_id if p.meta_id is not None else -1, p.kind.value))
        problems.extend(task_problems)
    return tuple(problems)
