"""Every bad input is one line and exit 2 (issue 15), through the real command lines in subprocesses.

One table of abusive inputs against ``python -m audit``, ``python -m conversion`` and ``python -m qwen_jax``: each
case asserts the exit code, a single ``error:`` line naming the file, tensor or argument, no traceback on stderr,
and no output left behind. The broken checkpoints are all made once per module from the demo checkpoint (built
with transformers), and the cases run two at a time from a thread pool (they are independent subprocesses, most of
which fail before JAX or torch is imported).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("torch")

from audit import demo

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
SAMPLES_NAME = "samples_med_bench_2026-05-01T10-15-30.123456.jsonl"
NAN_TENSOR = "model.layers.1.mlp.experts.down_proj"
FLIPPED_LEAF = "layers.2.linear_attn.in_proj"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------ the inputs


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _variant(base: Path, path: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(base, path, symlinks=True)
    edit(path)
    return path


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _missing_shard(path: Path) -> None:
    names = list(load_file(str(path / "model.safetensors")))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _edit_config(**fields) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | fields))

    return edit


def _symlink_loop(path: Path) -> None:
    (path / "model.safetensors").unlink()
    os.symlink("model.safetensors", path / "model.safetensors")


def _pickle_only(marker: Path) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / "model.safetensors").unlink()
        # A pickle whose unpickling creates ``marker``: it must never be unpickled.
        payload = (
            b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # protocol 0: os.system("touch ...")
        )
        (path / "pytorch_model.bin").write_bytes(payload)

    return edit


def _nan_tensor(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[NAN_TENSOR][0, 1, 2] = np.nan
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _flip_low_bit(path: Path) -> None:
    """Flips the lowest mantissa bit of one F32 value: invisible after the cast to bf16."""
    tensors = load_file(str(path / "model.safetensors"))
    value = tensors[NAN_TENSOR]
    assert value.dtype == np.float32
    value.reshape(-1).view(np.uint32)[5] ^= 1
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _template(text: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / "chat_template.jinja").write_text(text, encoding="utf-8")

    return edit


def _flip_orbax_leaf(orbax: Path) -> None:
    """Rewrites one leaf with one value changed: a valid Orbax leaf whose bytes differ from the manifest."""
    import orbax.checkpoint as ocp

    from qwen_jax.checkpoint import restore_leaf

    leaf = orbax / "params" / FLIPPED_LEAF
    value = restore_leaf(leaf).copy()
    value[0, 0] = -value[0, 0] if value[0, 0] else 1
    shutil.rmtree(leaf)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(leaf, args=ocp.args.StandardSave({"value": value}))


def _fake_bundle(path: Path, ids: list[int]) -> Path:
    """A reference bundle of one prompt (the arrays are placeholders: these cases stop before comparing)."""
    from audit.metrics import SKETCH_DIM, sketch_spec
    from audit.records import BUNDLE_FORMAT

    path.mkdir()
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "bundle_format": BUNDLE_FORMAT,
                "dtype": "bfloat16",
                "max_new_tokens": 2,
                "hidden_summary": sketch_spec(64),
            }
        )
    )
    (path / "prompts.json").write_text(json.dumps({"prompts": [{"name": "p", "text": "x", "ids": ids}]}))
    (path / "calibration.json").write_text(json.dumps({"calibration": None, "determinism": []}))
    n = len(ids) + 2
    arrays = {
        "0/tokens": np.zeros(n, np.int32),
        "0/hidden": np.zeros((9, n, 64), np.float32),
        "0/hidden_norms": np.zeros((9, n), np.float32),
        "0/hidden_sketch": np.zeros((9, n, SKETCH_DIM), np.float32),
        "0/logit_ids": np.zeros((n, 4), np.int32),
        "0/logit_values": np.zeros((n, 4), np.float32),
        "0/logit_lse": np.zeros(n),
        "0/router_ids": np.zeros((8, n, 5), np.uint8),
        "0/router_probs": np.zeros((8, n, 5), np.float32),
        "0/prompt_len": np.asarray(len(ids)),
    }
    np.savez(path / "arrays.npz", **arrays)
    return path


def _zip_slip_submission(path: Path) -> Path:
    logs = io.BytesIO()
    with zipfile.ZipFile(logs, "w") as z:
        z.writestr(f"../../evil/{SAMPLES_NAME}", "")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("../../evil.json", "{}")
        z.writestr("logs_public.zip", logs.getvalue())
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input of the table, made once from the demo checkpoint."""
    from conversion.convert import convert

    start = time.perf_counter()
    w = tmp_path_factory.mktemp("bad_inputs")
    base = demo.build_demo_checkpoint(w / "demo")
    marker = w / "PICKLE_PAYLOAD_RAN"
    paths: dict[str, Path] = {"root": w, "demo": base, "marker": marker}
    variants = {
        "truncated": _truncate,
        "missing_shard": _missing_shard,
        "mismatch": _edit_config(hidden_size=96),
        "loop": _symlink_loop,
        "pickle": _pickle_only(marker),
        "nan": _nan_tensor,
        "flipped_source": _flip_low_bit,
        "small_context": _edit_config(max_position_embeddings=64),
        "huge_context": _edit_config(max_position_embeddings=10**13),
        "no_config": lambda p: (p / "config.json").unlink(),
        "tpl_sandbox": _template("{% set _ = messages.append(1) %}"),
        "tpl_syntax": _template("{% for m in messages %}{{ m.content }"),
        "tpl_undefined": _template("{{ messages[0].nothing.deeper }}"),
        "tpl_range": _template("{% for i in range(10**9) %}x{% endfor %}"),
        "tpl_nested": _template(
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
        ),
        "tpl_repeat": _template("{{ 'a' * 10**9 }}"),
    }
    for name, edit in variants.items():
        paths[name] = _variant(base, w / name, edit)
    paths["orbax"] = convert(base, w / "orbax", "bfloat16", progress=False)
    paths["orbax_flipped"] = w / "orbax_flipped"
    shutil.copytree(paths["orbax"], paths["orbax_flipped"])
    _flip_orbax_leaf(paths["orbax_flipped"])
    from qwen_jax.tokenizer import load_tokenizer

    ids = load_tokenizer(base).encode("Привет")
    paths["bundle"] = _fake_bundle(w / "bundle", ids)
    paths["bundle_truncated"] = w / "bundle_truncated"
    shutil.copytree(paths["bundle"], paths["bundle_truncated"])
    arrays = paths["bundle_truncated"] / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:300])
    paths["afile"] = w / "a_file"
    paths["afile"].write_text("not a directory")
    paths["not_ours"] = w / "not_ours"
    paths["not_ours"].mkdir()
    (paths["not_ours"] / "keep.txt").write_text("x")
    paths["foreign_partial_out"] = w / "foreign_out"
    foreign = w / ".foreign_out.partial"
    foreign.mkdir()
    (foreign / "conversion_state.json").write_text(json.dumps({"format": "other", "sources": {}}))
    (foreign / "precious.txt").write_text("keep me")
    paths["foreign_partial"] = foreign
    paths["readonly"] = w / "readonly"
    paths["readonly"].mkdir()
    paths["readonly"].chmod(0o555)
    rows = {
        "prompts": [{"text": "Привет"}],
        "prompts_empty_text": [{"name": "blank", "text": ""}],
        "prompts_long": [{"name": "long", "text": "Привет! " * 200}],
        "prompts_kwargs_eos": [
            {
                "name": "clash",
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"eos_token": "x"},
            }
        ],
        "prompts_kwargs_agp": [
            {
                "name": "clash2",
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"add_generation_prompt": False},
            }
        ],
        "prompts_chat": [{"name": "chat", "messages": [{"role": "user", "content": "Привет"}]}],
    }
    for name, content in rows.items():
        paths[name] = _write_jsonl(w / f"{name}.jsonl", content)
    paths["prompts_none"] = w / "prompts_none.jsonl"
    paths["prompts_none"].write_text("\n\n")
    paths["prompts_bad_json"] = w / "prompts_bad_json.jsonl"
    paths["prompts_bad_json"].write_text('{"text": "ok"}\n{not json\n')
    (w / "empty_samples").mkdir()
    paths["samples_empty"] = w / "empty_samples" / SAMPLES_NAME
    paths["samples_empty"].write_text("")
    paths["zip_slip"] = _zip_slip_submission(w / "submission.zip")
    paths["sitecustomize"] = w / "inject"
    paths["sitecustomize"].mkdir()
    (paths["sitecustomize"] / "sitecustomize.py").write_text(
        "import audit.run\n\ndef _boom(*args, **kwargs):\n    raise RuntimeError('injected internal failure')\n\n"
        "audit.run.compare = _boom\n"
    )
    print(f"inputs built in {time.perf_counter() - start:.1f}s")
    return paths


# ------------------------------------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    module: str  # "audit", "conversion" or "qwen_jax"
    args: tuple[str, ...]  # "{key}" is replaced by the path of world[key]; "{out}" by this case's output dir
    code: int
    needles: tuple[str, ...]  # each must appear in the error line ("{key}" replaced as in args)
    absent: tuple[str, ...] = ("{out}",)  # must not exist afterwards
    env: tuple[tuple[str, str], ...] = ()
    file_size_limit: int | None = None  # RLIMIT_FSIZE: writes past it fail like a full disk
    skip_as_root: bool = False  # permission checks mean nothing to root


def audit(name, *args, code=2, needles=(), absent=("{out}",), **kw) -> Case:
    return Case(name, "audit", ("compare", *args, "--no-progress"), code, tuple(needles), tuple(absent), **kw)


def record(name, *args, needles=(), absent=("{out}",), **kw) -> Case:
    return Case(name, "audit", ("record", *args, "--no-progress"), 2, tuple(needles), tuple(absent), **kw)


def convert(name, *args, code=2, needles=(), absent=("{out}",), **kw) -> Case:
    return Case(name, "conversion", (*args, "--no-progress"), code, tuple(needles), tuple(absent), **kw)


def generate(name, *args, needles=(), absent=(), **kw) -> Case:
    return Case(name, "qwen_jax", ("generate", *args), 2, tuple(needles), tuple(absent), **kw)


R = ("--report", "{out}")
P = ("--prompts", "{prompts}")
CASES = [
    # ---- python -m audit: the checkpoint, validated before transformers or JAX loads it (item 1)
    audit("audit: missing checkpoint", "--checkpoint", "{root}/nowhere", *P, *R, needles=["nowhere", "not found"]),
    audit("audit: no config.json", "--checkpoint", "{no_config}", *P, *R, needles=["{no_config}", "config.json"]),
    audit("audit: truncated safetensors", "--checkpoint", "{truncated}", *P, *R, needles=["model.safetensors", "truncated"]),
    audit("audit: missing shard", "--checkpoint", "{missing_shard}", *P, *R, needles=["model-00002-of-00002", "missing"]),
    audit("audit: config does not match tensors", "--checkpoint", "{mismatch}", *P, *R, needles=["{mismatch}", "config.json implies"]),
    audit("audit: symlink loop", "--checkpoint", "{loop}", *P, *R, needles=["{loop}", "model.safetensors"]),
    audit("audit: pickle-only checkpoint", "--checkpoint", "{pickle}", *P, *R, needles=["pytorch_model.bin", "never unpickled"], absent=("{out}", "{marker}")),
    audit("audit: NaN weight", "--checkpoint", "{nan}", *P, *R, needles=[NAN_TENSOR, "non-finite", "model.safetensors"]),
    # ---- output paths, checked before any work (item 2)
    audit("audit: --report under a file", "--checkpoint", "{demo}", *P, "--report", "{afile}/report", needles=["--report", "a_file"], absent=()),
    audit("audit: --report is a file", "--checkpoint", "{demo}", *P, "--report", "{afile}", needles=["--report", "not a directory"], absent=()),
    audit("audit: --report not writable", "--checkpoint", "{demo}", *P, "--report", "{readonly}/r", needles=["--report", "not writable"], skip_as_root=True, absent=("{readonly}/r",)),
    record("record: --out under a file", "--checkpoint", "{demo}", *P, "--out", "{afile}/bundle", needles=["--out", "a_file"], absent=()),
    record("record: --out is not a bundle", "--checkpoint", "{demo}", *P, "--out", "{not_ours}", needles=["not_ours", "not a reference bundle"], absent=()),
    # ---- limits (item 3)
    audit("audit: --max-new-tokens 0", "--checkpoint", "{demo}", *P, *R, "--max-new-tokens", "0", needles=["--max-new-tokens"]),
    audit("audit: --max-new-tokens -1", "--checkpoint", "{demo}", *P, *R, "--max-new-tokens", "-1", needles=["--max-new-tokens"]),
    audit("audit: 10^9 new tokens past the context", "--checkpoint", "{demo}", *P, *R, "--max-new-tokens", "1000000000", needles=["1000000000 new tokens", "context of 4096"]),
    audit("audit: prompt longer than the context", "--checkpoint", "{small_context}", "--prompts", "{prompts_long}", *R, needles=["'long'", "context of 64"]),
    audit("audit: decode state larger than memory", "--checkpoint", "{huge_context}", *P, *R, "--max-new-tokens", "100000000000", needles=["GiB", "free"]),
    audit("audit: empty prompt", "--checkpoint", "{demo}", "--prompts", "{prompts_empty_text}", *R, needles=["'blank'", "empty"]),
    audit("audit: --limit 0", "--checkpoint", "{demo}", *P, *R, "--limit", "0", needles=["--limit"]),
    audit("audit: unknown --dtype", "--checkpoint", "{demo}", *P, *R, "--dtype", "float16", needles=["--dtype", "float16"]),
    # ---- prompts and samples (item 7 and the cases that passed before)
    audit("audit: prompts file missing", "--checkpoint", "{demo}", "--prompts", "{root}/none.jsonl", *R, needles=["none.jsonl", "not found"]),
    audit("audit: prompts file without prompts", "--checkpoint", "{demo}", "--prompts", "{prompts_none}", *R, needles=["prompts_none.jsonl", "no prompts"]),
    audit("audit: prompts line not JSON", "--checkpoint", "{demo}", "--prompts", "{prompts_bad_json}", *R, needles=["prompts_bad_json.jsonl:2"]),
    audit("audit: empty samples file", "--checkpoint", "{demo}", "--samples", "{samples_empty}", *R, needles=[SAMPLES_NAME]),
    audit("audit: zip-slip submission", "--checkpoint", "{demo}", "--submission", "{zip_slip}", *R, needles=["submission.zip"], absent=("{out}", "{root}/../evil.json", "{root}/../evil")),
    # ---- chat templates (item 6)
    audit("audit: template sandbox refusal", "--checkpoint", "{tpl_sandbox}", "--prompts", "{prompts_chat}", *R, needles=["tpl_sandbox/chat_template.jinja", "sandbox"]),
    audit("audit: template syntax error", "--checkpoint", "{tpl_syntax}", "--prompts", "{prompts_chat}", *R, needles=["tpl_syntax/chat_template.jinja", "syntax error"]),
    audit("audit: template undefined attribute", "--checkpoint", "{tpl_undefined}", "--prompts", "{prompts_chat}", *R, needles=["tpl_undefined/chat_template.jinja", "undefined"]),
    audit("audit: template range(10**9)", "--checkpoint", "{tpl_range}", "--prompts", "{prompts_chat}", *R, needles=["tpl_range/chat_template.jinja", "range()"]),
    audit("audit: template nested ranges", "--checkpoint", "{tpl_nested}", "--prompts", "{prompts_chat}", *R, needles=["tpl_nested/chat_template.jinja", "range()"]),
    audit("audit: template 'a' * 10**9", "--checkpoint", "{tpl_repeat}", "--prompts", "{prompts_chat}", *R, needles=["tpl_repeat/chat_template.jinja", "repetition"]),
    audit("audit: chat_template_kwargs sets eos_token", "--checkpoint", "{demo}", "--prompts", "{prompts_kwargs_eos}", *R, needles=["'clash'", "eos_token"]),
    audit("audit: chat_template_kwargs sets add_generation_prompt", "--checkpoint", "{demo}", "--prompts", "{prompts_kwargs_agp}", *R, needles=["'clash2'", "add_generation_prompt"]),
    # ---- reference bundles and JAX weights (items 5, 7, 8)
    audit("audit: missing bundle", "--reference", "{root}/no_bundle", "--checkpoint", "{demo}", *R, needles=["no_bundle", "not found"]),
    audit("audit: truncated bundle", "--reference", "{bundle_truncated}", "--checkpoint", "{demo}", *R, needles=["arrays.npz", "truncated or corrupt"]),
    audit("audit: bf16 conversion with --dtype float32", "--checkpoint", "{demo}", *P, "--jax-checkpoint", "{orbax}", "--dtype", "float32", *R, needles=["{orbax}", "bfloat16", "float32"]),
    audit("audit: Orbax leaf altered since conversion", "--reference", "{bundle}", "--checkpoint", "{demo}", "--jax-checkpoint", "{orbax_flipped}", *R, needles=[FLIPPED_LEAF, "sha256"]),
    audit("audit: JAX checkpoint missing", "--reference", "{bundle}", "--checkpoint", "{demo}", "--jax-checkpoint", "{root}/no_weights", *R, needles=["no_weights", "not found"]),
    # ---- the contract for bugs (item 9): one line, exit 3, the traceback in the report directory
    audit("audit: internal error", "--checkpoint", "{demo}", *P, *R, code=3, needles=["internal error", "injected internal failure", "internal-error.log"], absent=(), env=(("PYTHONPATH", "{sitecustomize}"),)),
    # ---- python -m conversion
    convert("convert: --hf missing", "convert", "--hf", "{root}/missing", "--out", "{out}", needles=["missing", "not found"]),
    convert("convert: no safetensors", "convert", "--hf", "{no_config}/..", "--out", "{out}", needles=["no model.safetensors"]),
    convert("convert: truncated safetensors", "convert", "--hf", "{truncated}", "--out", "{out}", needles=["model.safetensors", "truncated"]),
    convert("convert: pickle-only", "convert", "--hf", "{pickle}", "--out", "{out}", needles=["pytorch_model.bin"], absent=("{out}", "{marker}")),
    convert("convert: NaN tensor", "convert", "--hf", "{nan}", "--out", "{out}", needles=[NAN_TENSOR, "non-finite"], absent=("{out}",)),
    convert("convert: --out not a conversion", "convert", "--hf", "{demo}", "--out", "{not_ours}", needles=["not_ours", "not a converted checkpoint"], absent=()),
    convert("convert: --out under a file", "convert", "--hf", "{demo}", "--out", "{afile}/orbax", needles=["--out", "a_file"], absent=()),
    convert("convert: --out under an unwritable dir", "convert", "--hf", "{demo}", "--out", "{readonly}/orbax", needles=["--out", "not writable"], absent=("{readonly}/orbax",), skip_as_root=True),
    convert("convert: .partial of another conversion", "convert", "--hf", "{demo}", "--out", "{foreign_partial_out}", needles=[".foreign_out.partial", "other sources"], absent=("{foreign_partial_out}",)),
    convert("convert: disk full", "convert", "--hf", "{demo}", "--out", "{out}", needles=["out of disk space", "rerun"], file_size_limit=20_000),
    convert("convert: unknown --dtype", "convert", "--hf", "{demo}", "--out", "{out}", "--dtype", "float16", needles=["--dtype"]),
    convert("verify: not a conversion", "verify", "--hf", "{demo}", "--ckpt", "{not_ours}", needles=["not_ours", "not a converted checkpoint"], absent=()),
    convert("verify: source changed below bf16", "verify", "--hf", "{flipped_source}", "--ckpt", "{orbax}", code=1, needles=["flipped_source/model.safetensors", "sha256"], absent=()),
    Case("plan: bad --mesh", "conversion", ("plan", "--mesh", "ep=3"), 2, ("ep=3",), ()),
    # ---- python -m qwen_jax generate
    generate("generate: missing checkpoint", "--checkpoint", "{root}/nope", "--prompt", "x", needles=["nope", "not found"]),
    generate("generate: --max-new-tokens 0", "--checkpoint", "{demo}", "--prompt", "x", "--max-new-tokens", "0", needles=["--max-new-tokens"]),
    generate("generate: --max-new-tokens -1", "--checkpoint", "{demo}", "--prompt", "x", "--max-new-tokens", "-1", needles=["--max-new-tokens"]),
    generate("generate: empty prompt", "--checkpoint", "{demo}", "--prompt", "", needles=["--prompt", "empty"]),
    generate("generate: 10^9 new tokens", "--checkpoint", "{demo}", "--prompt", "x", "--max-new-tokens", "1000000000", needles=["1000000000 new tokens", "context of 4096"]),
    generate("generate: prompt longer than the context", "--checkpoint", "{small_context}", "--prompt", "Привет! " * 200, needles=["context of 64"]),
    generate("generate: decode state larger than memory", "--checkpoint", "{huge_context}", "--prompt", "x", "--max-new-tokens", "100000000000", needles=["GiB", "free"]),
    generate("generate: template sandbox refusal", "--checkpoint", "{tpl_sandbox}", "--prompt", "x", "--chat", needles=["tpl_sandbox/chat_template.jinja", "sandbox"]),
    generate("generate: template 'a' * 10**9", "--checkpoint", "{tpl_repeat}", "--prompt", "x", "--chat", needles=["tpl_repeat/chat_template.jinja"]),
    generate("generate: truncated safetensors", "--checkpoint", "{truncated}", "--prompt", "x", needles=["model.safetensors", "truncated"]),
    generate("generate: NaN weight", "--checkpoint", "{nan}", "--prompt", "x", needles=[NAN_TENSOR, "non-finite"]),
    generate("generate: pickle-only checkpoint", "--checkpoint", "{pickle}", "--prompt", "x", needles=["pytorch_model.bin"], absent=("{marker}",)),
]  # fmt: skip


def _fill(text: str, world: dict[str, Path], out: Path) -> str:
    for key, path in world.items():
        text = text.replace("{" + key + "}", str(path))
    return text.replace("{out}", str(out))


def _with_file_size_limit(argv: list[str], limit: int | None) -> list[str]:
    """``argv`` run with writes past ``limit`` bytes failing like a full disk (EFBIG: SIGXFSZ is ignored), set by
    the shell rather than a ``preexec_fn`` (unsafe in a threaded process)."""
    if limit is None:
        return argv
    return ["bash", "-c", f"trap '' XFSZ; ulimit -f {max(1, limit // 1024)}; exec \"$@\"", "bash", *argv]


def run_case(case: Case, world: dict[str, Path]) -> subprocess.CompletedProcess:
    out = world["root"] / "outputs" / case.name.replace(" ", "_").replace("/", "_").replace(":", "")
    env = {
        **os.environ,
        "QWEN_JAX_AUDIT_CACHE": str(world["root"] / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in case.env:
        env[key] = os.pathsep.join([_fill(value, world, out), env.get(key, "")])
    argv = [sys.executable, "-m", case.module, *(_fill(a, world, out) for a in case.args)]
    start = time.perf_counter()
    result = subprocess.run(
        _with_file_size_limit(argv, case.file_size_limit),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    result.seconds = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def outcomes(world, request) -> dict[str, subprocess.CompletedProcess]:
    """Every selected case, run two at a time (independent subprocesses)."""
    selected = {
        item.callspec.params["case"].name
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    cases = [c for c in CASES if c.name in selected and not (c.skip_as_root and IS_ROOT)]
    (world["root"] / "outputs").mkdir(exist_ok=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {c.name: pool.submit(run_case, c, world) for c in cases}
        results = {name: future.result() for name, future in futures.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"{len(cases)} cases: {time.perf_counter() - start:.1f}s wall, {cpu:.1f}s CPU in subprocesses")
    return results


def test_the_table_covers_at_least_45_cases(outcomes):
    slowest = sorted(outcomes.items(), key=lambda kv: -kv[1].seconds)[:8]
    print("slowest cases:", ", ".join(f"{name} {r.seconds:.1f}s" for name, r in slowest))
    assert len(CASES) >= 45 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world, outcomes):
    if case.skip_as_root and IS_ROOT:
        pytest.skip("permissions do not apply to root")
    result = outcomes[case.name]
    out = world["root"] / "outputs" / case.name.replace(" ", "_").replace("/", "_").replace(":", "")
    err = result.stderr
    assert result.returncode == case.code, (result.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = "internal error" if case.code == 3 else ("error: " if case.code == 2 else "")
    if prefix:
        flagged = [line for line in lines if line.startswith(prefix)]
        assert len(flagged) == 1 and lines[-1] == flagged[0], err[-3000:]  # one line, the last one
        line = flagged[0]
    else:
        line = err
    for needle in case.needles:
        assert _fill(needle, world, out) in line, (needle, line)
    for path in case.absent:
        assert not Path(_fill(path, world, out)).exists(), path


def test_pickle_payload_never_ran(world, outcomes):
    """The pickle cases ran (the table above) and the payload's side effect did not happen."""
    assert any("pickle" in name for name in outcomes)
    assert not world["marker"].exists()


def test_internal_error_log_holds_the_traceback(world, outcomes):
    if "audit: internal error" not in outcomes:
        pytest.skip("case not selected")
    out = world["root"] / "outputs" / "audit_internal_error"
    log = out / "internal-error.log"
    assert log.is_file() and "Traceback" in log.read_text() and "injected internal failure" in log.read_text()
    assert str(log) in outcomes["audit: internal error"].stderr


def test_foreign_partial_is_kept_untouched(world, outcomes):
    """A .OUT.partial holding another conversion's state is refused, not deleted (nor anything in it)."""
    assert (world["foreign_partial"] / "precious.txt").read_text() == "keep me"
    assert json.loads((world["foreign_partial"] / "conversion_state.json").read_text())["format"] == "other"


def test_full_disk_keeps_the_partial_conversion_and_a_rerun_resumes(world, outcomes):
    """After the disk-full case, the partial dir is there, and the same command without the limit finishes."""
    if "convert: disk full" not in outcomes:
        pytest.skip("case not selected")
    out = world["root"] / "outputs" / "convert_disk_full"
    partial = out.parent / f".{out.name}.partial"
    assert partial.is_dir()
    case = next(c for c in CASES if c.name == "convert: disk full")
    rerun = run_case(dataclasses.replace(case, file_size_limit=None), world)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr and (out / "manifest.json").is_file() and not partial.exists()


# ------------------------------------------------------------------------------- non-finite values in the audit


def _runs(jax_hidden_nan_at=None, jax_logits_nan_at=None, ref_hidden_nan_at=None):
    """A reference and a JAX run of two prompts that agree exactly, with NaN placed where asked."""
    from audit import determinism, metrics
    from audit.jax_side import JaxRun
    from audit.records import Prompt, ReferenceRun, SequenceRecord

    rng = np.random.default_rng(0)
    n_states, length, hidden, vocab, k = 5, 6, 8, 16, 2
    refs, ours, position_metrics = [], [], []
    for prompt in range(2):
        tokens = rng.integers(0, vocab, length).astype(np.int32)
        h = rng.normal(size=(n_states, length, hidden)).astype(np.float32)
        logits = rng.normal(size=(length, vocab)).astype(np.float32)
        experts = np.tile(np.arange(k, dtype=np.int32), (n_states - 1, length, 1))
        probs = np.tile(np.array([0.5, 0.3, 0.2], np.float32), (n_states - 1, length, 1))
        ref_ids = np.tile(np.arange(k + 1, dtype=np.int32), (n_states - 1, length, 1))
        ref_h, jax_h, jax_logits = h.copy(), h.copy(), logits.copy()
        if ref_hidden_nan_at is not None and ref_hidden_nan_at[1] == prompt:
            ref_h[ref_hidden_nan_at[0], ref_hidden_nan_at[2] :] = np.nan
        if jax_hidden_nan_at is not None and jax_hidden_nan_at[1] == prompt:
            jax_h[jax_hidden_nan_at[0], jax_hidden_nan_at[2] :] = np.nan
        if jax_logits_nan_at is not None and jax_logits_nan_at[0] == prompt:
            jax_logits[jax_logits_nan_at[1] :] = np.nan
        view = metrics.logit_view(logits)
        generated = tokens[-2:]
        refs.append(SequenceRecord(4, tokens, generated, ref_h, experts, view, ref_ids, probs))
        ours.append(SequenceRecord(4, tokens, generated, jax_h, experts))
        position_metrics.append(metrics.per_position_logit_metrics(view, jax_logits))
    reference = ReferenceRun(
        prompts=tuple(Prompt(f"p{i}", "t", (1, 2, 3, 4)) for i in range(2)),
        sequences=tuple(refs),
        manifest={"dtype": "float32"},
        calibration=None,
        determinism=(determinism.logits_check("reference", [(True, 0.0)]),),
    )
    jax_run = JaxRun(tuple(ours), tuple(position_metrics), (None, None), (), None)
    return reference, jax_run


def _report(reference, jax_run) -> dict:
    from audit_reports import synthetic_report

    return synthetic_report(reference, jax_run)


def test_agreeing_runs_agree():
    report = _report(*_runs())
    assert report["verdict"]["status"] == "agree", report["verdict"]


def test_a_nan_hidden_state_is_a_divergence_named_where_it_first_appears():
    from audit.report import render_html, terminal_summary, validate_report

    report = _report(*_runs(jax_hidden_nan_at=(3, 1, 4)))
    verdict = report["verdict"]
    assert verdict["status"] == "diverge" and verdict["exit_code"] == 1
    assert verdict["first_diverging_layer"] == 3
    assert verdict["reasons"][0] == (
        "non-finite values: the jax side's hidden state 3 = layer 2 (linear_attention) first holds NaN or inf "
        "(prompt 1, position 4)"
    )
    assert not any("nan" in r for r in verdict["reasons"]), verdict["reasons"]
    layer = report["layers"][3]
    assert layer["exceeds"] is True and layer["rel_diff"] is None and layer["max_abs"] is None
    assert layer["max_abs_at"] == {"prompt": 1, "position": 4, "dim": 0}
    assert all(not entry["exceeds"] for entry in report["layers"][:3])  # never "rel_diff 0.0, exceeds false"
    validate_report(report)
    assert "VERDICT: DIVERGE" in terminal_summary(report) and "non-finite" in render_html(report)


def test_nan_logits_are_named_not_compared_as_numbers():
    report = _report(*_runs(jax_logits_nan_at=(0, 2)))
    verdict = report["verdict"]
    assert verdict["status"] == "diverge"
    assert verdict["reasons"][0] == (
        "non-finite values: the jax side's logits first holds NaN or inf (prompt 0, position 2)"
    )
    assert not any("exceeds the tolerance nan" in r or "KL nan" in r for r in verdict["reasons"])


def test_a_nan_in_the_reference_is_blamed_on_the_reference():
    verdict = _report(*_runs(ref_hidden_nan_at=(1, 0, 0)))["verdict"]
    assert verdict["status"] == "diverge" and verdict["first_diverging_layer"] == 1
    assert verdict["reasons"][0].startswith(
        "non-finite values: the reference side's hidden state 1 = layer 0"
    )


# ------------------------------------------------------------------------------- the library checks the same limits


def test_generate_and_stream_generate_check_the_limits_before_allocating(world):
    from qwen_jax import generate, load_hf, stream_generate
    from qwen_jax.limits import LimitError

    model = load_hf(world["demo"], "float32")
    context = model.cfg.max_position_embeddings
    bad = {
        "max_new_tokens must be a positive integer": dict(prompts=[[1, 2]], max_new_tokens=0),
        "max_new_tokens must be a positive integer, got -1": dict(prompts=[[1, 2]], max_new_tokens=-1),
        "empty (row 1 of 2)": dict(prompts=[[1, 2], []], max_new_tokens=2),
        f"exceeds the model's context of {context}": dict(prompts=[[1, 2]], max_new_tokens=context),
    }
    for needle, kw in bad.items():
        with pytest.raises(LimitError, match=re.escape(needle)):
            generate(model, kw["prompts"], max_new_tokens=kw["max_new_tokens"])
    with pytest.raises(LimitError, match="prompt is empty"):
        next(stream_generate(model, [], max_new_tokens=2))
    with pytest.raises(LimitError, match=f"context of {context}"):
        next(stream_generate(model, [1, 2, 3], max_new_tokens=context))
