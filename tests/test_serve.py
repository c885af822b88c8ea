"""``python -m qwen_jax serve`` on the demo checkpoint, in a subprocess on a free 127.0.0.1 port: the real lm-eval
client against it and the audit replaying what lm-eval logged; replies against ``qwen_jax.generate`` (fp32 and
bf16); ``--batch-invariant`` under 16 concurrent requests; a table of bad requests.

One fp32 ``--batch-invariant`` server is shared by the module; the bf16 test starts its own batching server. Every
prompt stays under 64 tokens and every ``max_tokens`` small, so each side compiles one prefill bucket and one cache
length. The demo model is a confident next-token map (``audit.hf_models``): its reply depends mostly on the last
prompt token, so the tests that must tell replies apart use completions prompts with different last words.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import qwen_jax
from audit import demo
from qwen_jax.chat import apply_chat_template
from qwen_jax.generate import default_stop_token_ids
from qwen_jax.replies import apply_until, split_reasoning
from qwen_jax.server.engine import finish
from qwen_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 256
PAD_TO_MULTIPLE = 64  # the server's default bucket
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300

# Prompt fragments from the demo's corpus (its BPE knows them), short enough for one 64-token bucket.
WORDS = demo.DEMO_PROMPTS[3]["messages"][1]["content"].split()


# ----------------------------------------------------------------------------------------------------
# A server in a subprocess.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, workdir: Path, *args: str, xla_flags: str = ""):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "requests.jsonl"
        self.out_path = workdir / "server.out"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qwen_jax", "serve", "--checkpoint", str(checkpoint),
                 "--port", str(self.port), "--log", str(self.log_path), "--max-model-len", str(MAX_MODEL_LEN),
                 *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip
        self._ready = False

    def ready(self) -> Server:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.out_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no /health after {STARTUP_TIMEOUT_S} s: {self.out_path.read_text()}")
            try:
                self._ready = self.call("GET", "/health", timeout=5)[0] == 200
            except OSError:
                time.sleep(0.5)
        return self

    def call(self, method: str, path: str, body=None, timeout: float = REQUEST_TIMEOUT_S, headers=None):
        """(status, raw body bytes); ``body`` is a dict (sent as JSON) or raw bytes."""
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def post(self, path: str, body) -> dict:
        status, raw = self.call("POST", path, body)
        assert status == 200, raw
        return json.loads(raw)

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("serve_demo") / "checkpoint")


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    """fp32, ``--batch-invariant``: batches decoded with ``generate(..., batch_invariant=True)``."""
    s = Server(demo_dir, tmp_path_factory.mktemp("server"), "--dtype", "float32", "--batch-invariant")
    try:
        yield s.ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return load_tokenizer(demo_dir)


def _render(tokenizer, messages, **kwargs) -> list[int]:
    """The prompt ids, rendered as the audit renders chat prompts (audit/prompts.py)."""
    text = apply_chat_template(
        tokenizer.chat_template,
        messages,
        add_generation_prompt=True,
        **tokenizer.special_tokens_map,
        **kwargs,
    )
    return tokenizer.encode(text)


def _reply_without_ids(raw: bytes) -> bytes:
    reply = json.loads(raw)
    return json.dumps(
        {k: v for k, v in reply.items() if k not in ("id", "created")}, ensure_ascii=False
    ).encode()


# ----------------------------------------------------------------------------------------------------
# The real lm-eval client, then the audit on what it logged.

TASK_YAML = """\
task: serve_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}"
doc_to_target: "{{{{outputs}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  chat_template_kwargs:
    enable_thinking: false
filter_list:
  - name: scoring
    filter:
      - function: custom
        filter_fn: !function serve_smoke_utils.remove_whitespace_and_nones
      - function: take_first
process_results: !function serve_smoke_utils.process_results
metric_list:
  - metric: em
    aggregation: mean
    higher_is_better: true
  - metric: f1
    aggregation: mean
    higher_is_better: true
"""

# MERA's filter and scoring, through the audit's own definitions of them.
TASK_UTILS = """\
from audit.scoring import mera_filter, mera_process_results


def remove_whitespace_and_nones(resps, docs):
    return [[mera_filter(r) for r in rs] for rs in resps]


def process_results(doc, results):
    return mera_process_results(doc["outputs"], results[0])
"""

# lm-eval 0.4.9.1 (the version of the MERA logs) reads transformers.AutoModelForVision2Seq when it registers its
# HF multimodal model; transformers 5 renamed it AutoModelForImageTextToText. The alias lets the unmodified CLI
# import; the local-chat-completions client does not touch it.
LM_EVAL_MAIN = """\
import sys
from transformers.utils import import_utils
_getattr = import_utils._LazyModule.__getattr__
def _renamed(self, name):
    return _getattr(self, "AutoModelForImageTextToText" if name == "AutoModelForVision2Seq" else name)
import_utils._LazyModule.__getattr__ = _renamed
from lm_eval.__main__ import cli_evaluate
sys.argv[0] = "lm_eval"
cli_evaluate()
"""


def _same_length_instructions(tokenizer, count: int) -> list[str]:
    """``count`` three-word instructions whose chat prompts have one token length: the audit then compiles its
    per-length JAX programs once instead of once per document (its replay prefills without bucketing)."""
    by_length: dict[int, list[str]] = {}
    for i in range(len(WORDS) - 2):
        text = " ".join(WORDS[i : i + 3])
        message = {"role": "user", "content": text, "type": "text"}  # as lm-eval sends it
        by_length.setdefault(len(_render(tokenizer, [message], enable_thinking=False)), []).append(text)
    return next(texts[:count] for texts in by_length.values() if len(texts) >= count)


def _write_task(directory: Path, instructions: list[str], max_gen_toks: int) -> None:
    docs = [
        {"instruction": text, "outputs": gold, "meta": {"id": k}}
        for k, (text, gold) in enumerate(zip(instructions, ("B", "A", "A, C"), strict=True))
    ]
    (directory / "docs.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    (directory / "serve_smoke.yaml").write_text(
        TASK_YAML.format(docs=directory / "docs.jsonl", max_gen_toks=max_gen_toks), encoding="utf-8"
    )
    (directory / "serve_smoke_utils.py").write_text(TASK_UTILS, encoding="utf-8")


@pytest.mark.slow  # (test budget: ~51 s)
def test_lm_eval_through_the_server_and_the_audit_reproduces_every_reply(
    server, demo_dir, tokenizer, tmp_path
):
    pytest.importorskip("lm_eval")
    max_gen_toks = 16
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    _write_task(task_dir, _same_length_instructions(tokenizer, 3), max_gen_toks)
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(task_dir), os.environ.get("PYTHONPATH", "")]),
    }
    model_args = f"base_url={server.url}/v1/chat/completions,model={demo_dir.name},max_retries=1"
    lm_eval = subprocess.run(
        [sys.executable, "-c", LM_EVAL_MAIN, "--model", "local-chat-completions", "--model_args", model_args,
         "--apply_chat_template", "--tasks", "serve_smoke", "--include_path", str(task_dir), "--log_samples",
         "--output_path", str(tmp_path / "lm_eval_out")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert lm_eval.returncode == 0, lm_eval.stderr[-3000:]
    samples = glob.glob(str(tmp_path / "lm_eval_out" / "*" / "samples_serve_smoke_*.jsonl"))
    assert len(samples) == 1, lm_eval.stderr[-3000:]
    logged = [json.loads(line) for line in Path(samples[0]).read_text(encoding="utf-8").splitlines()]
    assert len(logged) == 3
    assert all(s["filtered_resps"][0] for s in logged)  # non-empty replies: something to reproduce

    # The server logged each request with what it rendered; the replies are what lm-eval logged.
    chats = [r for r in server.log() if r.get("endpoint") == "/v1/chat/completions" and "reply" in r]
    for sample in logged:
        messages = json.loads(sample["arguments"]["gen_args_0"]["arg_0"][0])
        record = next(r for r in chats if r["request"]["messages"] == messages)
        assert record["request"]["max_tokens"] == max_gen_toks and record["request"]["stop"] == ["<|im_end|>"]
        assert record["reply"]["choices"][0]["message"]["content"] == sample["resps"][0][0]

    audit = subprocess.run(
        [sys.executable, "-m", "audit", "compare", "--checkpoint", str(demo_dir), "--samples", samples[0],
         "--dtype", "float32", "--thinking", "off", "--reasoning-split", "qwen3_thinking_off",
         "--max-new-tokens", str(max_gen_toks), "--report", str(tmp_path / "report"), "--no-progress"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    items = report["replay"]["items"]
    assert len(items) == 3
    assert all(item["equal"] for item in items), items
    assert [i["replayed"] for i in items] == [s["filtered_resps"][0] for s in logged]


# ----------------------------------------------------------------------------------------------------
# Replies against qwen_jax.generate; --batch-invariant under concurrency.


def _requests() -> list[tuple[str, dict]]:
    """16 requests: chat (thinking on and off, one with a stop string) and completions (text and token ids)."""
    out = []
    for k in range(8):
        body = {
            "messages": [{"role": "user", "content": " ".join(WORDS[: 2 + k])}],
            "max_tokens": 4 + k,
            "temperature": 0,
            "seed": 1234,
        }
        if k % 2:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        if k == 3:
            body["stop"] = ["do"]
        out.append(("/v1/chat/completions", body))
    for k in range(8):
        body = {"prompt": " ".join(WORDS[k : k + 3 + k % 3]), "max_tokens": 6 + k, "temperature": 0}
        if k == 5:
            body["stop"] = "e"
        out.append(("/v1/completions", body))
    return out


def _generate_row(model, prompt_ids, **kwargs) -> list[int]:
    out = qwen_jax.generate(model, [list(prompt_ids)], **kwargs)
    return [int(t) for t in out.tokens[0, : out.lengths[0]]]


def test_batch_invariant_concurrent_replies_equal_one_at_a_time_and_generate(server, demo_dir, tokenizer):
    requests = _requests()
    alone = [server.call("POST", path, body) for path, body in requests]
    assert all(status == 200 for status, _ in alone), alone
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: server.call("POST", *r), requests))
    assert [s for s, _ in together] == [200] * len(requests)
    assert [_reply_without_ids(raw) for _, raw in together] == [_reply_without_ids(raw) for _, raw in alone]
    texts = {json.dumps(json.loads(raw)["choices"][0], sort_keys=True) for _, raw in alone}
    assert len(texts) >= 8, "the requests should give different replies"

    # Every reply is qwen_jax.generate's greedy tokens of the prompt rendered independently, alone at batch 1,
    # though the concurrent requests were decoded in batches (one runs at a time; the others queue meanwhile).
    model = qwen_jax.load_hf(demo_dir, "float32")
    stop_ids = default_stop_token_ids(model)
    records = [r for r in server.log() if "reply" in r]
    assert max(r["prompts"][0]["batch"]["size"] for r in records) > 1, "no batch formed"
    for (path, body), (_, raw) in zip(requests, alone, strict=True):
        if path == "/v1/chat/completions":
            ids = _render(tokenizer, body["messages"], **body.get("chat_template_kwargs", {}))
        else:
            ids = tokenizer.encode(body["prompt"])
        matching = [r for r in records if r["request"] == body]
        assert len(matching) == 2  # alone and together
        for record in matching:
            (entry,) = record["prompts"]
            assert entry["prompt_ids"] == ids
            assert entry["batch"]["generate_kwargs"]["batch_invariant"] is True
            assert entry["batch"]["generate_kwargs"]["pad_to_multiple"] == PAD_TO_MULTIPLE
        expected = _generate_row(
            model,
            ids,
            max_new_tokens=body["max_tokens"],
            stop_token_ids=stop_ids,
            pad_to_multiple=PAD_TO_MULTIPLE,
            pad_token_id=stop_ids[0],
            batch_invariant=True,
        )
        assert [r["prompts"][0]["generated_ids"] for r in matching] == [expected, expected]
        # The reply text: decoded without special tokens, cut at the stop strings, split at </think>.
        kept = [t for t in expected if t not in stop_ids]
        text = apply_until(tokenizer.decode(kept, skip_special_tokens=True), body.get("stop") or ())
        choice = json.loads(raw)["choices"][0]
        if path == "/v1/completions":
            assert choice["text"] == text
        else:
            thinking = body.get("chat_template_kwargs", {}).get("enable_thinking", True)
            reasoning, content = split_reasoning(text, enable_thinking=thinking)
            assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (
                reasoning,
                content,
            )


def test_streaming_sends_the_same_reply(server):
    body = {
        "messages": [{"role": "user", "content": " ".join(WORDS[:4])}],
        "max_tokens": 8,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    whole = server.post("/v1/chat/completions", body)
    status, raw = server.call(
        "POST", "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    events = [line[len("data: ") :] for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_a_completions_request_with_several_prompts_answers_each(server, tokenizer):
    texts = [" ".join(WORDS[2:5]), " ".join(WORDS[6:8])]
    ids = [tokenizer.encode(t) for t in texts]
    alone = [
        server.post("/v1/completions", {"prompt": t, "max_tokens": 6})["choices"][0]["text"] for t in texts
    ]
    assert alone[0] != alone[1]
    for prompt in (texts, ids):  # several texts, or several token-id lists
        both = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert [(c["index"], c["text"]) for c in both["choices"]] == [(0, alone[0]), (1, alone[1])]
        assert both["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_models_and_health(server, demo_dir):
    status, raw = server.call("GET", "/v1/models")
    assert status == 200
    (model,) = json.loads(raw)["data"]
    assert model["id"] == demo_dir.name and model["max_model_len"] == MAX_MODEL_LEN
    assert server.call("GET", "/health")[0] == 200


# ----------------------------------------------------------------------------------------------------
# Bad requests: OpenAI's error body, a 4xx, and the server still answers.

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Привет! Как дела?"}]
# case: (method, path, body (dict: JSON; bytes: sent as is), expected status, expected error param or None)
# fmt: off
BAD_REQUESTS = {
    "malformed JSON": ("POST", CHAT, b'{"messages": [', 400, None),
    "not an object": ("POST", CHAT, b"[1, 2]", 400, None),
    "empty body": ("POST", CHAT, b"", 400, None),
    "unknown field": ("POST", CHAT, {"messages": HELLO, "max_tokens": 4, "best_of": 2}, 400, "best_of"),
    "no messages": ("POST", CHAT, {"max_tokens": 4}, 400, "messages"),
    "empty messages": ("POST", CHAT, {"messages": [], "max_tokens": 4}, 400, "messages"),
    "message without role": ("POST", CHAT, {"messages": [{"content": "x"}], "max_tokens": 4}, 400, "messages"),
    "max_tokens 0": ("POST", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens a string": ("POST", CHAT, {"messages": HELLO, "max_tokens": "4"}, 400, "max_tokens"),
    "sampling temperature": ("POST", CHAT, {"messages": HELLO, "temperature": 0.7}, 400, "temperature"),
    "n = 2": ("POST", CHAT, {"messages": HELLO, "max_tokens": 4, "n": 2}, 400, "n"),
    "stream not a bool": ("POST", CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    "prompt over the context": ("POST", CHAT, {"messages": [{"role": "user", "content": " ".join(WORDS * 8)}],
                                                "max_tokens": 4}, 400, "messages"),
    "max_tokens over the context": ("POST", CHAT, {"messages": HELLO, "max_tokens": MAX_MODEL_LEN}, 400,
                                    "messages"),
    "template refuses": ("POST", CHAT, {"messages": [{"role": "system", "content": "x"}]}, 400, "messages"),
    "unknown model": ("POST", CHAT, {"messages": HELLO, "model": "gpt-4", "max_tokens": 4}, 404, "model"),
    "completion token id out of range": ("POST", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    "completion echo": ("POST", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    "logprobs": ("POST", "/v1/completions", {"prompt": "x", "logprobs": 1, "max_tokens": 2}, 400, "logprobs"),
    "wrong method": ("GET", CHAT, None, 405, None),
    "unknown path": ("POST", "/v1/embeddings", {"input": "x"}, 404, None),
    "body too large": ("POST", CHAT, None, 413, None),  # announced by Content-Length, see _oversized
}
# fmt: on


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, case):
    method, path, body, status, param = BAD_REQUESTS[case]
    if case == "body too large":  # announce a huge body without sending it: refused on the header
        got, raw = _oversized(server, path)
    else:
        got, raw = server.call(method, path, body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param
    assert server.call("GET", "/health")[0] == 200


def _oversized(server, path):
    """A POST whose Content-Length announces 64 MiB; only the start of the body is sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\nConnection: close\r\n\r\n{{".encode()
        )
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ----------------------------------------------------------------------------------------------------
# Without --batch-invariant: batches of several requests, bf16, each reply re-made from the log.


def test_finish_cuts_at_the_stop_token_then_the_stop_strings(tokenizer):
    end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Привет! Как дела?")
    stop_ids = frozenset({end})
    plain = finish(tokenizer, [*ids, end, *ids], stop_ids, ())
    assert (plain.text, plain.finish_reason, plain.completion_tokens) == (
        "Привет! Как дела?",
        "stop",
        len(ids) + 1,
    )
    cut = finish(tokenizer, ids, stop_ids, ("Как",))
    assert (cut.text, cut.finish_reason) == ("Привет! ", "stop")
    assert "Как" in tokenizer.decode(ids[: cut.completion_tokens])
    assert "Как" not in tokenizer.decode(ids[: cut.completion_tokens - 1])
    assert finish(tokenizer, ids, stop_ids, ("нет",)).finish_reason == "length"


@pytest.mark.slow
def test_batched_bf16_replies_are_generate_of_the_logged_batches(demo_dir, tokenizer, tmp_path):
    """Concurrent requests decode together; each logged batch, given to qwen_jax.generate with the logged
    keywords, gives every row's tokens and reply. (Slow: a second server, and bf16 compilations of batch shapes.)"""
    server = Server(
        demo_dir, tmp_path, "--dtype", "bfloat16", "--max-batch-size", "4", "--batch-wait-ms", "500"
    )
    try:
        server.ready()
        requests = [body for path, body in _requests() if path == "/v1/completions"][:4]
        start = threading.Barrier(len(requests))

        def send(body):
            start.wait()
            return server.post("/v1/completions", body)

        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(send, requests))
        records = [r for r in server.log() if "reply" in r]
    finally:
        server.stop()
    assert len(records) == len(requests)
    batches: dict[int, list[tuple[dict, dict]]] = {}
    for record in records:
        (entry,) = record["prompts"]
        batches.setdefault(entry["batch"]["id"], []).append((entry, record))
    assert max(len(rows) for rows in batches.values()) > 1, "no two requests were decoded together"
    model = qwen_jax.load_hf(demo_dir, "bfloat16")
    stop_ids = frozenset(default_stop_token_ids(model))
    for rows in batches.values():
        rows.sort(key=lambda row: row[0]["batch"]["row"])
        kwargs = rows[0][0]["batch"]["generate_kwargs"]
        assert kwargs["max_new_tokens"] == max(record["request"]["max_tokens"] for _, record in rows)
        out = qwen_jax.generate(model, [entry["prompt_ids"] for entry, _ in rows], **kwargs)
        for k, (entry, record) in enumerate(rows):
            request = record["request"]
            assert entry["prompt_ids"] == tokenizer.encode(request["prompt"])
            n = min(int(out.lengths[k]), request["max_tokens"])
            expected = [int(t) for t in np.asarray(out.tokens[k, :n])]
            assert entry["generated_ids"] == expected
            stop = [request["stop"]] if isinstance(request.get("stop"), str) else request.get("stop") or []
            reply = next(r for r, body in zip(replies, requests, strict=True) if body == request)
            assert reply["choices"][0]["text"] == finish(tokenizer, expected, stop_ids, stop).text


# ----------------------------------------------------------------------------------------------------
# The batcher alone (no model), and bad command lines.


def test_batcher_batches_rows_that_arrive_together_and_survives_a_failing_batch():
    import asyncio

    from qwen_jax.server.batcher import Batcher

    batches = []

    def run_batch(rows):
        batches.append(list(rows))
        if "boom" in rows:
            raise RuntimeError("decoding failed")
        time.sleep(0.05)  # a batch takes a while: rows that arrive meanwhile wait for the next one
        return [row.upper() for row in rows]

    async def scenario():
        batcher = Batcher(run_batch, max_batch_size=3, wait_s=0.05)
        await batcher.start()
        try:
            together = await asyncio.gather(*(batcher.submit([c]) for c in "abcdefg"))
            with pytest.raises(RuntimeError, match="decoding failed"):
                await batcher.submit(["boom"])
            after = await batcher.submit(["x", "y"])
        finally:
            await batcher.stop()
        return together, after

    together, after = asyncio.run(scenario())
    assert together == [[c.upper()] for c in "abcdefg"] and after == ["X", "Y"]
    assert [len(b) for b in batches[:3]] == [3, 3, 1]  # 7 rows at once, at most 3 a batch, in arrival order
    assert [row for b in batches[:3] for row in b] == list("abcdefg")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mesh", "ep=3"], "does not divide"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    ],
)
def test_bad_serve_arguments_exit_2_with_one_line(demo_dir, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "qwen_jax", "serve", "--checkpoint", str(demo_dir), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.slow
def test_an_orbax_checkpoint_on_an_expert_parallel_mesh_serves_the_same_replies(server, demo_dir, tmp_path):
    """``python -m conversion convert`` of the demo, served with ``--mesh ep=2`` on 2 fake CPU devices: the
    greedy replies equal the unsharded HF-loaded server's (the sharded MoE is within 2e-5 of one device, far from
    this model's top-1 margins). (Slow: a conversion and a second server.)"""
    from conversion.__main__ import main as conversion_main

    orbax = tmp_path / "orbax"
    assert conversion_main(["convert", "--hf", str(demo_dir), "--out", str(orbax), "--no-progress"]) == 0
    requests = [body for path, body in _requests() if path == "/v1/completions"]
    expected = [server.post("/v1/completions", body)["choices"] for body in requests]
    sharded = Server(orbax, tmp_path, "--dtype", "float32", "--mesh", "ep=2", "--batch-invariant",
                     xla_flags="--xla_force_host_platform_device_count=2")  # fmt: skip
    # (make_mesh refuses ep=2 unless there are exactly 2 devices: the server did start on the mesh)
    try:
        sharded.ready()
        got = [sharded.post("/v1/completions", {**body, "model": "orbax"})["choices"] for body in requests]
    finally:
        sharded.stop()
    assert got == expected
