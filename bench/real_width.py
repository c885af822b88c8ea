"""JAX against HF transformers at the real widths of Qwen3.6-35B-A3B: prefill and greedy decode speed, peak memory.

    python bench/real_width.py [--dtype bfloat16|float32|both] [--rounds 2] [--repeats 3] [--cache DIR] [--json OUT]

The model: the real text config (``qwen_jax/data/qwen3_6_35b_a3b_config.json``: hidden 2048, 256 experts top-8,
attention head dim 256, DeltaNet heads 16/32 of dim 128, vocab 248,320) cut to 2 layers, [linear_attention,
full_attention]: 2.65 B parameters, 5.3 GB in bf16, 10.6 GB in fp32. Random weights (transformers' own init, seed
0), built once with transformers in bf16 and saved as safetensors into ``--cache`` (default
``~/.cache/qwen_jax_bench/real_width_2l_seed0``); the fp32 runs load the same file in fp32 on both sides (bf16
values held in fp32: the same arithmetic as any fp32 weights).

What is timed, with equal work on both sides, each through its public greedy ``generate``:
- **prefill** = ``generate(prompt, max_new_tokens=1)`` on a 512-token prompt (batch 1, random ids, seed 0): the
  forward over the prompt that fills the decode state and computes the **last position's logits only** (HF's
  ``generate`` passes ``logits_to_keep=1``; ``qwen_jax.generate``'s prefill keeps the last position), then the
  first greedy token. Speed: 512 / seconds.
- **decode** = ``generate(prompt, max_new_tokens=65)`` minus that prefill, in the same repeat: 64 greedy decode
  steps, each one token through the model reading its KV cache / DeltaNet state. Speed: 64 / seconds.
- HF: ``Qwen3_5MoeForCausalLM`` loaded as the audit's reference loads it (``audit.reference.load_reference_model``:
  eager attention, eager experts), ``generate(do_sample=False)``, no EOS, torch's default threads (one per core)
  with ``OMP_WAIT_POLICY=PASSIVE`` unless set (``bench/paired.py``: libgomp's spinning default made HF up to 10x
  slower on a shared machine). JAX: ``qwen_jax.load_hf`` and
  ``qwen_jax.generate`` (greedy, ``stop_token_ids=()``, cache length 768 for both calls, so both reuse one
  compiled program). Each side warms up once (JAX compiles there), then runs ``--repeats`` (prefill, decode) pairs.
- **peak RSS** of each side's own process (``VmHWM``: load, compile and the runs), over its parameters' bytes.
- **decode roofline** (``bench/roofline.py``): the bytes a batch-1 step must read (the lm_head, each layer's
  projections and shared expert, 8 of the 256 routed experts) over the read bandwidth measured by this script
  before each dtype's runs: the most tokens per second any exact implementation reaches here, and that as a
  multiple of HF's measured decode speed (the ceiling of the decode ratio).

Each side runs in its own subprocess, one at a time (never both at once), so that each fits in memory and its
peak RSS is its own; a side is skipped, with a note, when ``MemAvailable`` is below ``MEMORY_MARGIN`` x its weights,
and stopped, with its RSS by then, if ``MemAvailable`` falls under ``MEMORY_FLOOR`` while it runs.
The sides alternate ``--rounds`` times (HF, JAX, HF, JAX, ...), so a change in machine load hits both; the summary
gives, per side, the median over all repeats of all rounds, the ratio JAX speed / HF speed of those medians, and
each round's ratio (the spread). On a shared machine the speeds are noisy: say so next to any figure.

Acceptance (issue 12, on a quiet machine): JAX prefill >= 1.5x HF and decode >= 2.5x HF, in bf16 and in fp32;
JAX peak RSS <= 1.3x its weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paired
import roofline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "qwen_jax" / "data" / "qwen3_6_35b_a3b_config.json"
LAYER_TYPES = ["linear_attention", "full_attention"]
SEED = 0
PROMPT = 512
NEW = 64
MAX_LENGTH = PROMPT + 256  # the JAX cache length of both generate calls (one compiled program)
#: A side starts only when this many times its weights' bytes are available (weights, activations, headroom).
MEMORY_MARGIN = 1.3
#: A running side is stopped when the machine's available memory falls under this (bytes).
MEMORY_FLOOR = 1.5e9
PARAMS = 2_653_000_000  # about: embeddings and lm_head 1.02 B, 2 x 0.8 B experts, the rest 0.03 B
GB = 1e9


def text_config() -> dict:
    """The packaged real text config, cut to 2 layers [linear_attention, full_attention]."""
    text = json.loads(CONFIG.read_text())["text_config"]
    text.pop("full_attention_interval", None)
    return {**text, "num_hidden_layers": len(LAYER_TYPES), "layer_types": LAYER_TYPES}


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "qwen_jax_bench" / f"real_width_2l_seed{SEED}"


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (``VmHWM``: its own, unlike ``ru_maxrss``, which can include the parent's
    RSS at fork)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def prompt_ids(vocab_size: int):
    import numpy as np

    return np.random.RandomState(SEED).randint(0, vocab_size, (1, PROMPT))


def build(path: Path) -> None:
    """The random 2-layer real-width checkpoint, written atomically (temp dir, then rename)."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(SEED)
    model = Qwen3_5MoeForCausalLM._from_config(Qwen3_5MoeTextConfig(**text_config()), dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
    os.replace(tmp, path)


def run_hf(path: Path, dtype: str, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from audit.reference import load_reference_model

    t = time.perf_counter()
    model = load_reference_model(path, dtype)
    load_s = time.perf_counter() - t
    model.generation_config.eos_token_id = None  # no early stop: exactly the tokens asked for
    ids = torch.as_tensor(prompt_ids(model.config.vocab_size))
    mask = torch.ones_like(ids)

    def generate_tokens(n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n,
                pad_token_id=0,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        return out[0, PROMPT:].tolist()

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "load_s": load_s,
        **paired.timed_pairs(generate_tokens, NEW, repeats),
        "weight_bytes": weight_bytes,
        "peak_rss_bytes": own_peak_rss(),
        "settings": paired.hf_settings(),
    }


def run_jax(path: Path, dtype: str, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    from flax import nnx

    import qwen_jax

    t = time.perf_counter()
    model = qwen_jax.load_hf(path, dtype)
    load_s = time.perf_counter() - t
    ids = prompt_ids(model.cfg.vocab_size)

    def generate_tokens(n: int) -> list[int]:
        out = qwen_jax.generate(model, ids, max_new_tokens=n, stop_token_ids=(), max_length=MAX_LENGTH)
        return out.tokens[0].tolist()

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    return {
        "load_s": load_s,
        **paired.timed_pairs(generate_tokens, NEW, repeats),
        "weight_bytes": weight_bytes,
        "decode_step_bytes": roofline.model_decode_step_bytes(model),
        "peak_rss_bytes": own_peak_rss(),
        "devices": str(jax.devices()),
    }


def process_rss(pid: int, field: str = "VmHWM") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def in_subprocess(side: str, path: Path, dtype: str, repeats: int) -> dict:
    """One side in a fresh interpreter (this script with ``--side``): its JSON result, or its error. The side is
    stopped if the machine's ``MemAvailable`` falls under ``MEMORY_FLOOR`` (the error gives its RSS by then)."""
    argv = [sys.executable, __file__, "--side", side, "--cache", str(path), "--dtype", dtype]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*argv, "--repeats", str(repeats)], stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, process_rss(proc.pid))
            if mem_available() < MEMORY_FLOOR:
                peak = max(peak, process_rss(proc.pid))
                proc.kill()
                proc.wait()
                return {
                    "error": f"stopped: the machine ran low on memory (MemAvailable under {MEMORY_FLOOR / GB:.1f} "
                    f"GB) with this side at {peak / GB:.1f} GB peak RSS",
                    "peak_rss_bytes_when_stopped": peak,
                }
            time.sleep(1)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            return {"error": f"exit {proc.returncode}: {err.read().strip()[-2000:]}"}
        return json.loads(out.read().splitlines()[-1])


def summarise(dtype: str, rounds: list[dict], bandwidth: float | None = None) -> dict:
    """Speeds (``paired.summarise_speeds``: medians over every repeat of every round, per side; ratios JAX / HF of
    those; each round's ratios), peak RSS over the weights, load seconds, greedy tokens before the first
    difference, and the decode's memory roofline (:mod:`roofline`: the bytes a step reads over ``bandwidth``, the
    machine's read bandwidth, bounds any implementation's decode speed; also as a multiple of HF's speed)."""

    out: dict = {"dtype": dtype, **paired.summarise_speeds(rounds, PROMPT, NEW)}
    for side in ("hf", "jax"):
        ok = [r[side] for r in rounds if "error" not in r[side]]
        if ok:
            peak = max(r["peak_rss_bytes"] for r in ok)
            out[f"{side}_peak_rss_gb"] = peak / GB
            out[f"{side}_weight_gb"] = ok[0]["weight_bytes"] / GB
            out[f"{side}_peak_rss_over_weights"] = peak / ok[0]["weight_bytes"]
            out[f"{side}_load_s"] = statistics.median(r["load_s"] for r in ok)
        errors = [r[side]["error"] for r in rounds if "error" in r[side]]
        if errors:
            out[f"{side}_errors"] = errors
    steps = [r["jax"]["decode_step_bytes"] for r in rounds if "decode_step_bytes" in r["jax"]]
    if steps and bandwidth and "decode_tokens_per_s" in out:
        out["decode_roofline"] = roofline.bound(steps[0], bandwidth, out["decode_tokens_per_s"]["hf"])
    pairs = [
        (r["hf"]["tokens"], r["jax"]["tokens"])
        for r in rounds
        if "error" not in r["hf"] and "error" not in r["jax"]
    ]
    if pairs:
        hf_tokens, jax_tokens = pairs[0]
        same = next(
            (i for i, (a, b) in enumerate(zip(hf_tokens, jax_tokens, strict=True)) if a != b), len(hf_tokens)
        )
        out["greedy_tokens_equal_before_first_difference"] = f"{same}/{len(hf_tokens)}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=2, help="HF/JAX alternations per dtype (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="(prefill, decode) pairs per side and round")
    parser.add_argument(
        "--cache", type=Path, default=default_cache(), help="the checkpoint dir (built if absent)"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--side", choices=("hf", "jax", "build"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()

    if args.side == "build":
        build(args.cache)
        return 0
    if args.side:
        run = run_hf if args.side == "hf" else run_jax
        print(json.dumps(run(args.cache, args.dtype, args.repeats)))
        return 0

    paired.set_hf_cpu_environment()  # inherited by the sides' subprocesses
    if not (args.cache / "config.json").is_file():
        print(f"building the random 2-layer real-width checkpoint in {args.cache} (once) ...", flush=True)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--side", "build", "--cache", str(args.cache)], check=True)
    summaries = []
    for dtype in ("bfloat16", "float32") if args.dtype == "both" else (args.dtype,):
        need = MEMORY_MARGIN * PARAMS * (2 if dtype == "bfloat16" else 4)
        rounds, bandwidth = (
            [],
            roofline.read_bandwidth(),
        )  # here, in the parent: the sides' RSS stays their own
        for i in range(args.rounds):
            result = {}
            for side in ("hf", "jax"):
                if mem_available() < need:
                    result[side] = {
                        "error": f"skipped: {mem_available() / GB:.1f} GB available, {need / GB:.1f} GB needed"
                    }
                else:
                    print(f"{dtype} round {i + 1}/{args.rounds}: {side} ...", flush=True)
                    result[side] = in_subprocess(side, args.cache, dtype, args.repeats)
            rounds.append(result)
        summary = summarise(dtype, rounds, bandwidth)
        summary["rounds"] = rounds
        summaries.append(summary)
        brief = {k: v for k, v in summary.items() if k != "rounds"}
        print(json.dumps(brief, indent=1), flush=True)
    result = {
        "config": f"{CONFIG.relative_to(ROOT)} text config, layers {LAYER_TYPES}",
        "prompt_tokens": PROMPT,
        "decode_steps": NEW,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "summaries": summaries,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps([{k: v for k, v in s.items() if k != "rounds"} for s in summaries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
