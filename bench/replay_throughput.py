"""Throughput of the audit's JAX replay: batch 1 against bucketed batches, same replies.

    python bench/replay_throughput.py [--items 64] [--batch-size 16] [--rounds 1] [--quick] [--json OUT]

The bench config and checkpoint of ``bench/decode_vs_hf.py`` (hidden 512, 8 layers, 32 experts top-4, vocab 32k,
float32), with a byte-level BPE trained here and the Qwen3.6 chat template. ``--items`` synthetic MERA-format
samples (one ``samples_aqua_bench_*.jsonl`` file, lm-eval 0.4.9.1's layout, ``--predict_only`` metrics) with
prompts spanning 100-1,500 tokens (evenly spread, in a seeded order, counted after rendering and tokenisation as the
replay does; the range is asserted and printed) and ``max_gen_toks`` of 32-256 (seeded), replayed by ``audit.replay.replay_samples``
through the JAX side's greedy (``audit.jax_side.greedy``, qwen_jax's batch-invariant mode): once at batch 1, once
in batches of ``--batch-size``, both bucketed the same way (``audit.batching``).

Each replay first compiles its programs (a warm-up: each batch shape the replay will use, one new token), timed
apart; then the timed replay. Tokens/s counts each item's generated tokens up to its own budget and stop (the work
a batch does past an item's budget, and its filler rows, are not counted). ``--rounds`` alternates the two timed
replays that many times (the machine is shared: medians and ranges are printed). Asserts: every item's reply is the
same in both; per kind (prefill, decode loop), the programs compiled are at most the number of buckets of the plan.
Prints tokens/s of each, the ratio, the programs and buckets, and where the time goes (prefill and decode, from the
warm-up's per-shape prefill time); ``--quick``: 8 items of 100-300 tokens and 8-24 new tokens (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_hf import build_checkpoint  # the bench config's checkpoint (seed 1234)

SYLLABLES = ("ка", "ро", "ми", "на", "то", "ле", "су", "ва", "де", "по", "ри", "жа", "хо", "це", "гу", "бы")
TOKENIZER_VOCAB = 2000
SAMPLES_NAME = "samples_aqua_bench_2026-12-02T00-00-00.000001.jsonl"
FULL = dict(items=64, prompt=(100, 1500), new=(32, 256))
QUICK = dict(items=8, prompt=(100, 300), new=(8, 24))


def build_tokenizer(directory: Path, words: list[str]) -> None:
    """A byte-level BPE on random words (audit.tiny_tokenizer) with the Qwen3.6 chat template, saved beside the
    checkpoint."""
    from audit.tiny_tokenizer import build_tokenizer_dir
    from qwen_jax.chat import load_default_chat_template

    rng = random.Random(1)
    corpus = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(500)]
    template = load_default_chat_template()
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}
    build_tokenizer_dir(directory, corpus, TOKENIZER_VOCAB, config)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")


def sample_line(doc_id: int, text: str, max_gen_toks: int) -> str:
    """One lm-eval 0.4.9.1 ``--log_samples`` record of MERA's aqua_bench (predict-only: no gold), logged reply
    empty."""
    from audit.samples import chat_prompt_json, doc_hash, prompt_hash, target_hash

    doc = {"instruction": "{question}", "inputs": {"question": text}, "outputs": "", "meta": {"id": doc_id}}
    arg0 = chat_prompt_json(text)
    record = {
        "doc_id": doc_id,
        "doc": doc,
        "target": "",
        "arguments": {"gen_args_0": {"arg_0": [arg0], "arg_1": {"do_sample": False, "until": ["<|im_end|>"],
                                                                "max_gen_toks": max_gen_toks}}},
        "resps": [[""]],
        "filtered_resps": [""],
        "filter": "scoring",
        "metrics": ["bypass"],
        "doc_hash": doc_hash(doc),
        "prompt_hash": prompt_hash(arg0),
        "target_hash": target_hash(""),
        "bypass": None,
    }  # fmt: skip
    return json.dumps(record, ensure_ascii=False) + "\n"


def fitted_text(tokens, words: list[str], rng: random.Random, target: int, floor: int) -> tuple[str, int]:
    """Seeded words whose rendered prompt (the chat template, tokenised as the replay does) has as many tokens as it
    can without passing ``target``, and at least ``floor``: the longest prefix of a seeded word list within
    ``target`` (a binary search: each word adds its own tokens, the byte-level BPE splitting at spaces), one word
    more when that falls short of ``floor``. Returns the text and its prompt's tokens."""
    from qwen_jax.chat import render_chat

    pool = [rng.choice(words) for _ in range(target + 1)]  # a word is at least one token: past the target

    def length(n: int) -> int:
        messages = [{"role": "user", "content": " ".join(pool[:n])}]
        rendered = render_chat(tokens.template, messages, source="bench", add_generation_prompt=True)
        return len(tokens.tokenizer.encode(rendered))

    low, high = 1, len(pool)  # the longest prefix within the target lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= target else (low, middle - 1)
    n = low + 1 if length(low) < floor else low
    return " ".join(pool[:n]), length(n)


def write_samples(path: Path, tokens, words: list[str], spec: dict, seed: int = 0) -> list[tuple[int, int]]:
    """``spec["items"]`` samples whose rendered prompts span ``spec["prompt"]`` (token counts evenly spread over
    it, in a seeded order: :func:`fitted_text`) with a seeded ``max_gen_toks`` in ``spec["new"]``; returns the
    (prompt tokens, max_gen_toks) of each."""
    rng = random.Random(seed)
    shortest, longest = spec["prompt"]
    items = spec["items"]
    targets = [shortest + round((longest - shortest) * k / max(items - 1, 1)) for k in range(items)]
    rng.shuffle(targets)
    lines, shapes = [], []
    for doc_id, target in enumerate(targets):
        text, length = fitted_text(tokens, words, rng, target, shortest)
        budget = rng.randint(*spec["new"])
        lines.append(sample_line(doc_id, text, budget))
        shapes.append((length, budget))
    path.write_text("".join(lines), encoding="utf-8")
    return shapes


def replay(files, model, tokens, stop, batch_size: int, generate=None):
    """``audit.replay.replay_samples`` through the JAX side's batch-invariant greedy (or ``generate``)."""
    from audit import jax_side
    from audit.batching import bucket_length
    from audit.replay import replay_samples

    def jax_generate(prompts, max_new_tokens):
        return jax_side.greedy(model, prompts, max_new_tokens, stop, batch_size)

    return replay_samples(
        files,
        tokenizer=tokens.tokenizer,
        chat_template=tokens.template,
        generate=generate or jax_generate,
        max_new_tokens=100_000,  # no cap: each item's max_gen_toks
        batch_size=batch_size,
        bucket=bucket_length,
        stop_token_ids=stop,
    )


def warm_up(files, model, tokens, stop, batch_size: int) -> dict:
    """Compiles every program the replay at ``batch_size`` will use: its batch shapes (from a dry run of the replay
    that generates nothing), one new token each. Returns the programs, buckets, seconds and per-shape prefill
    seconds (the second call of each shape: compiled)."""
    from audit import jax_side
    from audit.batching import ProgramCount, bucket_length, budget_class

    shapes = {}

    def record(prompts, max_new_tokens):
        length = bucket_length(max(len(p) for p in prompts))
        shapes[(len(prompts), length, length + budget_class(max_new_tokens))] = prompts
        return [[] for _ in prompts]

    replay(files, model, tokens, stop, batch_size, generate=record)
    start = time.perf_counter()
    prefill = {}
    with ProgramCount() as programs:
        for (rows, length, max_length), prompts in shapes.items():
            for _ in range(2):  # the second: the prefill alone (a token), compiled
                t = time.perf_counter()
                jax_side.greedy_batch(
                    model, prompts, 1, stop, rows=rows, length=length, max_length=max_length
                )
                prefill[(rows, length, max_length)] = time.perf_counter() - t
    return {
        "seconds": time.perf_counter() - start,
        "programs": programs.programs,
        "buckets": sorted({(length, max_length) for _, length, max_length in shapes}),
        "shapes": sorted(shapes),
        "prefill_s": prefill,
    }


def timed(files, model, tokens, stop, batch_size: int) -> dict:
    from audit.batching import ProgramCount

    calls = []

    def generate(prompts, max_new_tokens):
        from audit import jax_side

        t = time.perf_counter()
        out = jax_side.greedy(model, prompts, max_new_tokens, stop, batch_size)
        calls.append((len(prompts), max(len(p) for p in prompts), max_new_tokens, time.perf_counter() - t))
        return out

    with ProgramCount() as programs:
        start = time.perf_counter()
        result = replay(files, model, tokens, stop, batch_size, generate=generate)
        seconds = time.perf_counter() - start
    generated = sum(item.generated_tokens for item in result.items)
    return {"result": result, "seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds,
            "calls": calls, "programs_after_warm_up": programs.total}  # fmt: skip


def where_time_goes(warm: dict, run: dict) -> dict:
    """Prefill seconds (each call's shape's prefill as measured in the warm-up) and the rest (the decode loop)."""
    from audit.batching import bucket_length, budget_class

    prefill = 0.0
    for rows, longest, budget, _ in run["calls"]:
        length = bucket_length(longest)
        prefill += warm["prefill_s"][(rows, length, length + budget_class(budget))]
    total = sum(c[3] for c in run["calls"])
    return {"generate_s": total, "prefill_s": prefill, "decode_s": total - prefill, "calls": len(run["calls"]),
            "decode_steps": sum(c[2] for c in run["calls"])}  # fmt: skip


def check_programs(warm: dict) -> None:
    """Per kind (each jitted entry point), at most one program per bucket of the plan."""
    for name, n in warm["programs"].items():
        assert n <= len(warm["buckets"]), f"{name}: {n} programs for {len(warm['buckets'])} buckets"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, help="samples (default 64; --quick: 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="alternating timed replays of each side")
    parser.add_argument("--quick", action="store_true", help="8 short items: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    spec = dict(QUICK if args.quick else FULL)
    if args.items:
        spec["items"] = args.items

    import qwen_jax  # noqa: F401  (sets XLA flags before the backend starts)
    from audit.prompts import load_checkpoint_tokenizer
    from audit.replay import load_samples_files
    from qwen_jax.checkpoint import load_model_dir

    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        build_checkpoint(checkpoint)
        build_tokenizer(checkpoint, words)
        tokens = load_checkpoint_tokenizer(checkpoint)
        shapes = write_samples(Path(tmp) / SAMPLES_NAME, tokens, words, spec)
        lengths = [n for n, _ in shapes]
        print(
            f"prompts after tokenisation: {min(lengths)}-{max(lengths)} tokens", file=sys.stderr, flush=True
        )
        assert spec["prompt"][0] <= min(lengths) and max(lengths) <= spec["prompt"][1], (lengths, spec)
        files = load_samples_files([Path(tmp) / SAMPLES_NAME])
        model = load_model_dir(checkpoint, "float32", None)
        stop = tuple(tokens.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
        sizes = {"batch 1": 1, f"batch {args.batch_size}": args.batch_size}
        warm = {}
        for name, size in sizes.items():
            warm[name] = warm_up(files, model, tokens, stop, size)
            print(f"{name}: compiled in {warm[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
        runs = {name: [] for name in sizes}
        for round_ in range(args.rounds):
            for name, size in sizes.items():
                runs[name].append(timed(files, model, tokens, stop, size))
                print(
                    f"round {round_ + 1}, {name}: {runs[name][-1]['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    single, batched = runs.values()
    for run in batched + single[1:]:
        assert run["result"].items == single[0]["result"].items, "batched replies differ from batch 1's"
    for w in warm.values():
        check_programs(w)
    tps = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    (name1, name2) = sizes
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(single, batched, strict=True)]
    print(f"{spec['items']} items: prompts {min(lengths)}-{max(lengths)} tokens, max_gen_toks "
          f"{min(b for _, b in shapes)}-{max(b for _, b in shapes)}; {single[0]['tokens']} generated tokens "
          f"counted; replies identical at batch 1 and {args.batch_size}: yes")  # fmt: skip
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        profile = where_time_goes(warm[name], rs[0])
        print(f"{name}: {tps[name]:.1f} tokens/s (median of {len(rs)}; {min(secs):.1f}-{max(secs):.1f} s a replay); "
              f"warm-up (compiling) {warm[name]['seconds']:.1f} s; {len(warm[name]['buckets'])} buckets, "
              f"{len(warm[name]['shapes'])} batch shapes, compiled programs {sum(warm[name]['programs'].values())} "
              f"{warm[name]['programs']}; time: prefill {profile['prefill_s']:.1f} s, decode "
              f"{profile['decode_s']:.1f} s over {profile['calls']} calls ({profile['decode_steps']} decode steps)")  # fmt: skip
    ratio = statistics.median(ratios)
    print(
        f"ratio {name2} / {name1}: {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)}; target 5x: "
        f"{'met' if ratio >= 5 else 'missed'})"
    )
    if args.json:
        results = {
            "spec": spec, "batch_size": args.batch_size, "rounds": args.rounds, "tokens": single[0]["tokens"],
            "tokens_per_s": tps, "ratio": ratio, "ratios": ratios,
            "seconds": {name: [r["seconds"] for r in rs] for name, rs in runs.items()},
            "warm_up": {name: {k: v for k, v in w.items() if k != "prefill_s"} for name, w in warm.items()},
            "profile": {name: where_time_goes(warm[name], rs[0]) for name, rs in runs.items()},
        }  # fmt: skip
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_json.write_text(json.dumps(results, indent=2, default=str))
        tmp_json.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
