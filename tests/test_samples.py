"""Tests for audit.samples: lm-eval ``--log_samples`` files, hashes and MERA submission zips."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from mera_fixtures import AGRO, ALL, AQUA, DST_NAMES, FIXTURES, MED

from audit.samples import (
    LOGS_ZIP_NAME,
    MismatchKind,
    SamplesError,
    chat_prompt_json,
    check_submission_outputs,
    doc_hash,
    hash_string,
    mera_doc_to_text,
    parse_samples_filename,
    prompt_hash,
    read_logs_zip,
    read_samples,
    read_submission,
    target_hash,
    task_hash,
)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fixture_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# The fixtures themselves.


def test_fixtures_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.render().items():
        assert (FIXTURES / name).read_text(encoding="utf-8") == text, name


# ---------------------------------------------------------------------------------------------------
# Reading samples files.


def test_read_med_bench_fields():
    sf = read_samples(MED)
    assert (sf.task, sf.date, len(sf)) == ("med_bench", "2026-05-01T10-15-30.123456", 6)
    assert sf.timestamp.isoformat() == "2026-05-01T10:15:30.123456"
    assert [s.doc_id for s in sf] == [0, 1, 2, 3, 4, 5]
    assert [s.meta_id for s in sf] == [101, 102, 103, 104, 105, 106]
    assert [s.gold for s in sf] == ["B", "C", "A", "D", "A", "B"]
    assert [s.target for s in sf] == ["B", "C", "A", "D", "A", "B"]
    first = sf.samples[0]
    assert first.line == 1 and first.where == f"{MED}:1"
    assert first.filter == "scoring"
    assert first.metrics == ("f1", "em")
    assert first.metric_values == {"f1": 1, "em": 1}
    assert first.gen_kwargs == {"do_sample": False, "until": ["<|im_end|>"], "max_gen_toks": 10000}
    assert first.requests[0].prompt_in_list  # JsonChatStr is logged as a one-element list
    assert first.extra == {}
    assert set(first.doc["inputs"]) == {"question", "option_a", "option_b", "option_c", "option_d"}
    messages = first.messages()
    assert messages == [{"role": "user", "content": first.user_text(), "type": "text"}]
    assert first.user_text().startswith("Ответьте на вопрос по медицине")
    assert first.user_text().endswith("без пояснений.")  # med_bench strips the trailing "\n"


def test_replies_as_logged():
    sf = read_samples(MED)
    by_meta = sf.by_meta_id()
    # A leading space is logged raw in resps and stripped in filtered_resps.
    assert (by_meta[102].response, by_meta[102].filtered_response) == (" C", "C")
    # A null chat content is logged as the string "None" and filtered to "".
    assert (by_meta[103].response, by_meta[103].filtered_response) == ("None", "")
    assert by_meta[103].content_was_null
    assert not by_meta[102].content_was_null
    # Without a reasoning parser the think block stays in the reply.
    assert by_meta[104].filtered_response == "<think>\nВопрос простой.\n</think>\n\nD"


def test_agro_rows_carry_null_options_and_multi_answers():
    sf = read_samples(AGRO)
    assert sf.task == "agro_bench" and len(sf) == 7
    assert [s.gold for s in sf] == ["A,C", "A,C", "B,D,E", "C", "A,B,F", "A", "B,E"]
    first = sf.samples[0]
    # datasets unified the schema: a 4-option row still has option_e..option_h, as null.
    assert list(first.doc["inputs"]) == ["question"] + [f"option_{c}" for c in "abcdefgh"]
    assert [first.doc["inputs"][f"option_{c}"] for c in "efgh"] == [None] * 4
    assert "None" not in first.user_text()
    assert first.user_text().endswith("\nОтвет:")  # agro prompts are not stripped
    eight = sf.by_meta_id()[2004]
    assert "H. Сорго" in eight.user_text()
    assert sf.by_meta_id()[2007].response == "\n\nB,E"
    assert sf.by_meta_id()[2007].filtered_response == "B,E"


def test_predict_only_samples_have_bypass_and_no_gold():
    sf = read_samples(AQUA)
    assert sf.task == "aqua_bench"
    for s in sf:
        assert s.metrics == ("bypass",)
        assert s.metric_values == {"bypass": None}
        assert s.target == "" and s.gold == ""
    assert [s.filtered_response for s in sf] == ["B", "A,B", ""]


@pytest.mark.parametrize("task", sorted(ALL))
def test_logged_hashes_recompute(task):
    for s in read_samples(ALL[task]):
        assert s.hash_mismatches() == ()
        assert doc_hash(s.doc) == s.doc_hash
        assert target_hash(s.target) == s.target_hash


@pytest.mark.parametrize("task", sorted(ALL))
def test_prompt_hash_round_trip(task):
    """doc -> MERA prompt text -> lm-eval messages JSON -> prompt_hash reproduces the logged hash."""
    for s in read_samples(ALL[task]):
        text = mera_doc_to_text(task, s.doc)
        assert text == s.user_text()
        rebuilt = chat_prompt_json(text)
        assert rebuilt == s.prompt
        assert prompt_hash(rebuilt) == s.prompt_hash
        # It is sha256 of the JSON string, not of an escaped-ASCII dump or of the bare text.
        assert prompt_hash(json.dumps(json.loads(rebuilt))) != s.prompt_hash
        assert prompt_hash(text) != s.prompt_hash


def test_hash_string_is_sha256_of_utf8():
    assert hash_string("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert hash_string("Ответ: A") == hashlib.sha256("Ответ: A".encode()).hexdigest()
    assert prompt_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_chat_prompt_json_format():
    assert chat_prompt_json("Вопрос") == '[{"role": "user", "content": "Вопрос", "type": "text"}]'
    assert chat_prompt_json("q", system_instruction="s") == (
        '[{"role": "system", "content": "s", "type": "text"}, '
        '{"role": "user", "content": "q", "type": "text"}]'
    )


def test_task_hash_matches_lm_eval_formula():
    sf = read_samples(MED)
    lines = [json.loads(line) for line in fixture_lines(MED)]
    expected = sha256("".join(r["doc_hash"] + r["prompt_hash"] + r["target_hash"] for r in lines))
    assert task_hash(sf.samples) == expected


def test_mera_doc_to_text_rules():
    doc = {"instruction": "  {question} [{option_a}] {id}\n", "inputs": {"question": "В?", "option_a": "x"}}
    med = {**doc, "instruction": "  {question} [{option_a}]\n"}
    assert mera_doc_to_text("med_bench", med) == "В? [x]"  # med strips
    agro = {**doc, "meta": {"id": 7}}
    assert mera_doc_to_text("agro_bench", agro) == "  В? [x] 7\n"  # agro formats meta keys too, no strip
    clash = {**agro, "meta": {"question": "dup"}}
    with pytest.raises(SamplesError, match="in both inputs and meta"):
        mera_doc_to_text("aqua_bench", clash)
    with pytest.raises(SamplesError, match="not a MERA Industrial task"):
        mera_doc_to_text("mmlu", agro)
    with pytest.raises(SamplesError, match="cannot build the prompt: KeyError"):
        mera_doc_to_text("med_bench", {"instruction": "{missing}", "inputs": {}})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("samples_med_bench_2026-05-01T10-15-30.123456.jsonl", ("med_bench", "2026-05-01T10-15-30.123456")),
        ("out/model/samples_agro_bench_2026-05-01T11-20-45.jsonl", ("agro_bench", "2026-05-01T11-20-45")),
        ("samples_x_2026-01-02T03-04-05.6.json", ("x", "2026-01-02T03-04-05.6")),
    ],
)
def test_parse_samples_filename(name, expected):
    assert parse_samples_filename(name) == expected


@pytest.mark.parametrize(
    "name",
    ["results_2026-05-01T10-15-30.123456.json", "samples_med_bench.jsonl", "samples_med_bench_2026.jsonl"],
)
def test_parse_samples_filename_rejects(name):
    with pytest.raises(SamplesError, match=re.escape("not a samples_<task>_<date>.jsonl file name")):
        parse_samples_filename(name)


def test_task_override_allows_any_file_name(tmp_path):
    path = write_lines(tmp_path / "renamed.jsonl", fixture_lines(MED))
    sf = read_samples(path, task="med_bench")
    assert (sf.task, sf.date, len(sf)) == ("med_bench", "", 6)
    with pytest.raises(SamplesError, match=re.escape("renamed.jsonl: not a samples_")):
        read_samples(path)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    lines = fixture_lines(MED)
    path = write_lines(tmp_path / MED.name, [lines[0], "", "   ", lines[1]])
    sf = read_samples(path)
    assert [s.line for s in sf] == [1, 4]


def test_line_separators_inside_strings_do_not_split_records(tmp_path):
    record = json.loads(fixture_lines(MED)[0])
    record["resps"] = [["B\u2028\u0085\x1c"]]  # str.splitlines() would split here; lm-eval leaves them raw
    line = json.dumps(record, ensure_ascii=False)
    sf = read_samples(write_lines(tmp_path / MED.name, [line]))
    assert sf.samples[0].response == "B\u2028\u0085\x1c"


# ---------------------------------------------------------------------------------------------------
# Malformed input: one-line messages naming file and line.


def _mutate(line: str, fn) -> str:
    record = json.loads(line)
    fn(record)
    return json.dumps(record, ensure_ascii=False)


def _malformed(tmp_path: Path, bad_line: str, line_no: int = 2) -> SamplesError:
    lines = fixture_lines(MED)
    lines[line_no - 1] = bad_line
    path = write_lines(tmp_path / MED.name, lines)
    with pytest.raises(SamplesError) as info:
        read_samples(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_no}: "), message
    assert isinstance(info.value, ValueError)
    return info.value


def test_bad_json_line(tmp_path):
    good = fixture_lines(MED)[1]
    err = _malformed(tmp_path, good[:-20])
    assert "invalid JSON" in str(err) and "column" in str(err)


def test_not_an_object(tmp_path):
    assert str(_malformed(tmp_path, "[1, 2]")).endswith("expected a JSON object, got list")


@pytest.mark.parametrize("field", ["doc_id", "doc", "resps", "filtered_resps", "prompt_hash", "metrics"])
def test_missing_field(tmp_path, field):
    line = _mutate(fixture_lines(MED)[2], lambda r: r.pop(field))
    assert str(_malformed(tmp_path, line, 3)).endswith(f"missing field {field!r}")


def test_missing_metric_value(tmp_path):
    line = _mutate(fixture_lines(MED)[1], lambda r: r.pop("em"))
    assert str(_malformed(tmp_path, line)).endswith("missing field 'em' (listed in 'metrics')")


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda r: r.update(doc_id="1"), "field 'doc_id' must be an integer, got str"),
        (lambda r: r.update(doc_id=True), "field 'doc_id' must be an integer, got bool"),
        (lambda r: r.update(doc=None), "field 'doc' must be an object, got null"),
        (lambda r: r.update(target=5), "field 'target' must be a string, got int"),
        (lambda r: r.update(arguments={}), "field 'arguments' must be a non-empty object, got dict"),
        (lambda r: r["arguments"]["gen_args_0"].pop("arg_1"), "missing field 'arguments.gen_args_0.arg_1'"),
        (
            lambda r: r["arguments"]["gen_args_0"].update(arg_0=["a", "b"]),
            "arguments.gen_args_0.arg_0 must be a string or a one-string list",
        ),
        (lambda r: r.update(resps=[[None]]), "resps[0][0] must be a string, got null"),
        (lambda r: r.update(resps=["B"]), "resps[0] must be a non-empty list of strings"),
        (
            lambda r: r.update(filtered_resps=[["B"]]),
            "filtered_resps[0] must be a string (take_first), got list",
        ),
        (lambda r: r.update(filtered_resps=["B", "C"]), "1 requests but 1 resps and 2 filtered_resps"),
        (lambda r: r.update(prompt_hash="abc"), "field 'prompt_hash' is not a sha256 hex digest"),
        (lambda r: r.update(metrics="em"), "field 'metrics' must be a list of strings"),
    ],
)
def test_wrong_types(tmp_path, mutation, expected):
    line = _mutate(fixture_lines(MED)[1], mutation)
    assert str(_malformed(tmp_path, line)).endswith(expected)


def test_duplicate_doc_id(tmp_path):
    lines = fixture_lines(MED)
    line = _mutate(lines[3], lambda r: r.update(doc_id=1))
    assert str(_malformed(tmp_path, line, 4)).endswith("duplicate doc_id 1 (first on line 2)")


def test_invalid_utf8(tmp_path):
    lines = [line.encode() for line in fixture_lines(MED)]
    lines[1] = lines[1][:40] + b"\xff" + lines[1][40:]
    path = tmp_path / MED.name
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SamplesError, match="^" + re.escape(f"{path}:2: not valid UTF-8")):
        read_samples(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(SamplesError, match="cannot read"):
        read_samples(tmp_path / "samples_med_bench_2026-05-01T10-15-30.123456.jsonl")


def test_messages_of_a_non_json_prompt(tmp_path):
    line = _mutate(fixture_lines(MED)[0], lambda r: r["arguments"]["gen_args_0"].update(arg_0="plain text"))
    sf = read_samples(write_lines(tmp_path / MED.name, [line]))
    assert not sf.samples[0].requests[0].prompt_in_list
    with pytest.raises(
        SamplesError, match="^" + re.escape(f"{tmp_path / MED.name}:1: arg_0 is not a JSON chat")
    ):
        sf.samples[0].messages()


def test_by_meta_id_rejects_duplicates(tmp_path):
    lines = fixture_lines(MED)
    lines[1] = _mutate(lines[1], lambda r: r["doc"]["meta"].update(id=101))
    sf = read_samples(write_lines(tmp_path / MED.name, lines))
    with pytest.raises(SamplesError, match=r":2: duplicate doc.meta.id 101 \(first on line 1\)"):
        sf.by_meta_id()


# ---------------------------------------------------------------------------------------------------
# Submission zips, built the way MERA's log_to_submission.py builds them.

OLD_MED_NAME = "samples_med_bench_2026-04-30T09-00-00.000000.jsonl"
RESULTS_NAME = "results_2026-05-01T12-00-00.000002.json"


def build_submission(tmp_path: Path, edit=None) -> Path:
    """Make ``submission.zip`` from the fixtures as log_to_submission.py does, then let ``edit(task, test)``
    change the per-task output lists before they are written (to plant mismatches)."""
    outputs_dir = tmp_path / "outputs"
    outputs_dir.mkdir()
    for path in ALL.values():
        shutil.copy(path, outputs_dir / path.name)
    # An older med_bench run with different replies: log_to_submission uses only the newest file.
    old = [_mutate(line, lambda r: r.update(filtered_resps=["D"])) for line in fixture_lines(MED)]
    write_lines(outputs_dir / OLD_MED_NAME, old)
    task_hashes = {}
    for task, path in ALL.items():
        records = [json.loads(line) for line in fixture_lines(path)]
        task_hashes[task] = sha256(
            "".join(r["doc_hash"] + r["prompt_hash"] + r["target_hash"] for r in records)
        )
    results = {"results": {}, "git_hash": "d539716", "task_hashes": task_hashes}
    (outputs_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2), encoding="utf-8")

    dst = tmp_path / "submission"
    dst.mkdir()
    for task, path in ALL.items():
        test = [
            {"outputs": r["filtered_resps"][0], "meta": {"id": int(r["doc"]["meta"]["id"])}}
            for r in map(json.loads, fixture_lines(path))
        ]
        if edit is not None:
            edit(task, test)
        with open(dst / f"{DST_NAMES[task]}.json", "w", encoding="utf-8") as f:
            json.dump({"data": {"test": test}}, f, ensure_ascii=False, indent=4)
    logs_dir = dst / "logs_public"
    logs_dir.mkdir()
    for path in outputs_dir.glob("*.json*"):
        shutil.copy2(path, logs_dir)
    shutil.make_archive(str(logs_dir), "zip", str(logs_dir))
    shutil.rmtree(logs_dir)
    return Path(shutil.make_archive(str(tmp_path / "submission"), "zip", str(dst)))


def test_submission_reads_and_matches_logs(tmp_path):
    path = build_submission(tmp_path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [
            "logs_public.zip",
            "ruTXTAgroBench.json",
            "ruTXTAquaBench.json",
            "ruTXTMedQFundamental.json",
        ]
    sub = read_submission(path)
    assert sorted(sub.outputs) == ["agro_bench", "aqua_bench", "med_bench"]
    assert [e.meta_id for e in sub.outputs["med_bench"]] == [101, 102, 103, 104, 105, 106]
    assert sub.outputs["med_bench"][2].outputs == ""  # the null reply
    assert sub.logs.samples["med_bench"].date == "2026-05-01T10-15-30.123456"  # the newest run
    assert sub.logs.superseded == {"agro_bench": (), "aqua_bench": (), "med_bench": (OLD_MED_NAME,)}
    assert (
        sub.logs.samples["med_bench"].source
        == f"{path}!{LOGS_ZIP_NAME}!samples_med_bench_2026-05-01T10-15-30.123456.jsonl"
    )
    assert list(sub.logs.results) == [RESULTS_NAME]
    hashes = sub.logs.results[RESULTS_NAME]["task_hashes"]
    for task, sf in sub.logs.samples.items():
        assert task_hash(sf.samples) == hashes[task]
    assert check_submission_outputs(sub) == ()


def test_submission_with_one_mismatched_output(tmp_path):
    def edit(task, test):
        if task == "agro_bench":
            assert test[1] == {"outputs": "A, C", "meta": {"id": 2002}}
            test[1]["outputs"] = "A,C"  # "corrected" after the run: now scores EM 1 instead of 0

    problems = check_submission_outputs(read_submission(build_submission(tmp_path, edit)))
    assert len(problems) == 1
    (problem,) = problems
    assert (problem.task, problem.kind, problem.meta_id) == ("agro_bench", MismatchKind.DIFFERS, 2002)
    assert (problem.submitted, problem.logged) == ("A,C", "A, C")
    assert problem.describe() == (
        "agro_bench meta.id=2002: submission outputs 'A,C' != logged filtered_resps[0] 'A, C'"
    )


def test_submission_missing_extra_and_duplicate_entries(tmp_path):
    def edit(task, test):
        if task == "med_bench":
            del test[0]  # meta.id 101 dropped
            test.append({"outputs": "B", "meta": {"id": 999}})  # not in the logs
            test.append(dict(test[0]))  # meta.id 102 twice
        if task == "aqua_bench":
            test[2]["outputs"] = None  # null instead of ""

    problems = check_submission_outputs(read_submission(build_submission(tmp_path, edit)))
    assert [(p.task, p.meta_id, p.kind) for p in problems] == [
        ("aqua_bench", 503, MismatchKind.DIFFERS),
        ("med_bench", 101, MismatchKind.MISSING_FROM_SUBMISSION),
        ("med_bench", 102, MismatchKind.DUPLICATE_IN_SUBMISSION),
        ("med_bench", 999, MismatchKind.NOT_IN_LOGS),
    ]
    assert problems[1].describe() == "med_bench meta.id=101: missing from submission"


def test_submission_missing_task_file(tmp_path):
    path = build_submission(tmp_path)
    trimmed = tmp_path / "trimmed.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w") as dst:
        for info in src.infolist():
            if info.filename != "ruTXTAquaBench.json":
                dst.writestr(info, src.read(info))
    problems = check_submission_outputs(read_submission(trimmed))
    assert [(p.task, p.kind) for p in problems] == [("aqua_bench", MismatchKind.TASK_MISSING_FROM_SUBMISSION)]


def test_submission_errors_name_the_member(tmp_path):
    path = build_submission(tmp_path)
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "ruTXTMedQFundamental.json":
                data = b'{"data": {"test": [{"outputs": "B"}]}}'
            dst.writestr(info, data)
    with pytest.raises(SamplesError, match=r"broken.zip!ruTXTMedQFundamental.json: data.test\[0\]: missing"):
        read_submission(broken)

    no_logs = tmp_path / "nologs.zip"
    with zipfile.ZipFile(no_logs, "w") as zf:
        zf.writestr("ruTXTMedQFundamental.json", '{"data": {"test": []}}')
    with pytest.raises(SamplesError, match=re.escape("no logs_public.zip inside")):
        read_submission(no_logs)

    not_zip = tmp_path / "not.zip"
    not_zip.write_text("hello")
    with pytest.raises(SamplesError, match="not a readable zip file"):
        read_submission(not_zip)


def test_malformed_samples_inside_logs_zip_names_zip_member_and_line(tmp_path):
    lines = fixture_lines(MED)
    lines[1] = lines[1][:-5]
    logs = tmp_path / LOGS_ZIP_NAME
    with zipfile.ZipFile(logs, "w") as zf:
        zf.writestr(MED.name, "".join(line + "\n" for line in lines))
    with pytest.raises(SamplesError, match="^" + re.escape(f"{logs}!{MED.name}:2: invalid JSON")):
        read_logs_zip(logs)
