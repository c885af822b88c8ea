"""Gradient-based attribution of one output token to the input tokens, as a JSON file and a plot.

    python examples/attribution.py                           # the demo checkpoint, its greeting, next token
    python examples/attribution.py --checkpoint HF_DIR --prompts prompts.jsonl --prompt 2 \\
        --position 40 --target-token 1234 --steps 64 --out attribution/

Writes OUT/attribution.json and OUT/attribution.png (OUT, default ``attribution``, is written whole or not at all).

The attributed quantity is f = log p(target | tokens up to ``--position``), fp32, where the target is the model's
greedy token there unless ``--target-token`` is given (default position: the prompt's last token, so the target is
the first generated token). It is differentiated with respect to each input position's embedding, without
touching the model code: the model's ``embed_tokens`` leaf is swapped (``nnx.split`` / ``nnx.merge``) for a
per-call table that holds one row per (path step, position), and ``input_ids`` index that table.

Three attributions per position l with embedding e_l:
- ``gradient_norm``: |df/de_l|, the sensitivity;
- ``gradient_x_input``: <df/de_l, e_l>, the first-order contribution;
- ``integrated_gradients``: <e_l - b, mean over the path of df/de_l> along the straight path from the baseline
  b (every position holds the pad token's embedding) to the prompt, midpoint rule with ``--steps`` points. These
  would add up to f(prompt) - f(baseline) (completeness) if f were smooth along the path; the JSON gives both
  sides and the gap, which comes from the midpoint rule and from the router: its top-k choice changes in steps
  along the path, and the gradient does not see those jumps. All the path's points run as one batch: one forward
  and one backward pass.
Positions after ``--position`` get exactly zero (the model is causal).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import add_common_arguments, checkpoint_dir, render_prompts, run, write_results  # examples/
from flax import nnx

import qwen_jax
from audit.errors import AuditInputError
from audit.prompts import load_checkpoint_tokenizer


def path_alphas(steps: int) -> np.ndarray:
    """The interpolation points: 0 (the baseline), ``steps`` midpoints, 1 (the prompt)."""
    return np.concatenate([[0.0], (np.arange(steps) + 0.5) / steps, [1.0]])


def embedding_gradients(
    model, ids: np.ndarray, baseline: np.ndarray, position: int, target: int | None, steps: int
):
    """log p(target) at ``position`` on each point of the path from ``baseline`` [L, hidden] to the prompt's
    embeddings, and its gradient with respect to that point's embeddings: (f [R], grads [R, L, hidden], target,
    embeddings [L, hidden]) for the R = steps + 2 points of :func:`path_alphas`."""
    graphdef, embed_state, rest = nnx.split(model, nnx.PathContains("embed_tokens"), ...)
    embeddings = np.asarray(model.embed_tokens[...], np.float32)[ids]  # [L, hidden]
    alphas = path_alphas(steps)
    length = len(ids)
    rows = len(alphas)
    table_ids = np.arange(rows * length, dtype=np.int32).reshape(
        rows, length
    )  # row r reads its own table rows

    def log_probs(table):
        with_table = nnx.merge(graphdef, jax.tree.map(lambda _: table, embed_state), rest)
        logits = qwen_jax.forward(with_table, table_ids)[:, position].astype(jnp.float32)
        chosen = jnp.argmax(jax.lax.stop_gradient(logits[-1])) if target is None else target
        log_p = jax.nn.log_softmax(logits)[:, chosen]
        return log_p.sum(), (log_p, chosen)

    points = baseline[None] + alphas[:, None, None] * (embeddings - baseline)[None]  # [R, L, hidden]
    table = jnp.asarray(points.reshape(rows * length, -1), model.dtype)
    grads, (log_p, chosen) = jax.grad(log_probs, has_aux=True)(table)
    grads = np.asarray(grads, np.float32).reshape(rows, length, -1)
    return np.asarray(log_p, np.float64), grads, int(chosen), embeddings


def attributions(log_p, grads, embeddings, baseline, steps: int) -> dict:
    """The three per-position attributions and the completeness check of integrated gradients."""
    at_prompt = grads[-1]
    path_mean = grads[1 : 1 + steps].mean(0)
    integrated = ((embeddings - baseline) * path_mean).sum(-1)
    difference = float(log_p[-1] - log_p[0])
    return {
        "attributions": {
            "gradient_norm": np.linalg.norm(at_prompt, axis=-1).tolist(),
            "gradient_x_input": (at_prompt * embeddings).sum(-1).tolist(),
            "integrated_gradients": integrated.tolist(),
        },
        "completeness": {
            "steps": steps,
            "sum_of_integrated_gradients": float(integrated.sum()),
            "logprob_at_prompt_minus_at_baseline": difference,
            "gap": float(integrated.sum()) - difference,
        },
    }


def attribution_figure(results: dict):
    """Integrated gradients (signed) and the gradient norm per input token."""
    from matplotlib.figure import Figure

    tokens = results["tokens"]
    labels = [repr(t["text"])[1:-1] or "·" for t in tokens]
    xs = np.arange(len(tokens))
    fig = Figure(figsize=(max(8.0, 0.16 * len(tokens) + 2), 6.4))
    integrated, norm = fig.subplots(2, 1, sharex=True)
    values = np.array(results["attributions"]["integrated_gradients"])
    integrated.bar(xs, values, color=np.where(values >= 0, "C2", "C3"))
    integrated.axhline(0, color="black", linewidth=0.6)
    integrated.set_ylabel("integrated gradients")
    target = results["target"]
    integrated.set_title(
        f"log p({target['text']!r} | tokens up to {target['position']}) = {target['logprob']:.3f}; "
        f"attribution to each input token"
    )
    norm.bar(xs, results["attributions"]["gradient_norm"], color="C0")
    norm.set_ylabel("|gradient|")
    norm.set_xticks(xs)
    norm.set_xticklabels(labels, rotation=90, fontsize=6)
    norm.set_xlabel("input token")
    fig.tight_layout()
    return fig


def select_prompt(prompts, choice: str):
    """The prompt named ``choice``, else the one at index ``choice``."""
    by_name = {p.name: p for p in prompts}
    if choice in by_name:
        return by_name[choice]
    if choice.isdigit() and int(choice) < len(prompts):
        return prompts[int(choice)]
    raise AuditInputError(f"--prompt {choice}: no such prompt (names: {', '.join(by_name)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "attribution")
    parser.add_argument("--prompts", type=Path, help="JSONL prompts, as for `python -m audit compare`")
    parser.add_argument(
        "--prompt", help="which prompt, by name or index (default: the first; the demo's: its greeting)"
    )
    parser.add_argument("--position", type=int, help="the output position (default: the prompt's last token)")
    parser.add_argument("--target-token", type=int, help="the token id to explain (default: the greedy one)")
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients path points (default 32)")
    args = parser.parse_args(argv)

    checkpoint = checkpoint_dir(args.checkpoint)
    prompts = render_prompts(checkpoint, args.prompts)
    prompt = select_prompt(prompts, args.prompt or ("greeting" if args.prompts is None else "0"))
    ids = np.asarray(prompt.ids, np.int32)
    position = len(ids) - 1 if args.position is None else args.position
    if not 0 <= position < len(ids):
        raise AuditInputError(f"--position {position}: prompt {prompt.name!r} has {len(ids)} tokens")
    if args.steps < 1:
        raise AuditInputError(f"--steps {args.steps}: needs at least 1")
    model = qwen_jax.load_hf(checkpoint, args.dtype)
    if args.target_token is not None and not 0 <= args.target_token < model.cfg.vocab_size:
        raise AuditInputError(
            f"--target-token {args.target_token}: vocabulary size is {model.cfg.vocab_size}"
        )

    tokenizer = load_checkpoint_tokenizer(checkpoint).tokenizer
    pad = tokenizer.pad_token_id
    embeddings = np.asarray(model.embed_tokens[...], np.float32)
    baseline = np.broadcast_to(embeddings[pad] if pad is not None else 0.0, (len(ids), embeddings.shape[1]))
    log_p, grads, target, embedded = embedding_gradients(
        model, ids, baseline, position, args.target_token, args.steps
    )
    results = {
        "checkpoint": str(checkpoint),
        "dtype": args.dtype,
        "prompt": prompt.name,
        "tokens": [
            {"position": i, "id": int(t), "text": tokenizer.decode([int(t)])} for i, t in enumerate(ids)
        ],
        "target": {
            "position": position,
            "id": target,
            "text": tokenizer.decode([target]),
            "logprob": float(log_p[-1]),
            "chosen": "greedy" if args.target_token is None else "given",
        },
        "baseline": "pad token embedding" if pad is not None else "zeros",
    }
    results |= attributions(log_p, grads, embedded, baseline, args.steps)
    write_results(args.out, "attribution", results, attribution_figure(results))
    check = results["completeness"]
    print(
        f"log p({results['target']['text']!r}) = {results['target']['logprob']:.4f} at position {position}; "
        f"integrated gradients sum {check['sum_of_integrated_gradients']:.4f} vs "
        f"f(prompt) - f(baseline) {check['logprob_at_prompt_minus_at_baseline']:.4f}"
    )
    print(f"wrote {args.out}/attribution.json and attribution.png")


if __name__ == "__main__":
    sys.exit(run(main))
