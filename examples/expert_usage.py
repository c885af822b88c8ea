"""Per-layer expert usage of the MoE router over a set of prompts: how often each expert is chosen, with what
weight, and how evenly the load is spread, as a JSON file and a plot.

    python examples/expert_usage.py                          # the demo checkpoint and its 4 prompts
    python examples/expert_usage.py --checkpoint HF_DIR --prompts prompts.jsonl --out usage/

Writes OUT/expert_usage.json and OUT/expert_usage.png (OUT, default ``expert-usage``, is written whole or not at
all). The prompts run as one left-padded batch through ``qwen_jax.forward(..., return_hidden_states=True)``, whose
``routing`` gives, per MoE layer and token, the top-k expert ids, their renormalised weights and the router's fp32
probabilities over all experts; padding is left out of every count.

Per layer: ``counts`` (top-k choices of each expert, over all tokens and slots), ``load`` (counts / (tokens x k):
the share of the routed work), ``mean_weight`` (the expert's mean routing weight when chosen), ``mean_probability``
(its mean router probability over all tokens), ``load_entropy`` (the entropy of ``load`` over log(E): 1 when every
expert gets the same share), ``max_over_mean`` (the busiest expert's load over the mean load), ``unused`` (experts
never chosen) and ``load_balancing_loss`` (E x sum_e f_e P_e, with f_e the fraction of tokens that choose e and P_e
its mean probability: HF's ``load_balancing_loss_func`` without its coefficient; k when perfectly balanced).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import add_common_arguments, checkpoint_dir, render_prompts, run, write_results  # examples/

import qwen_jax
from qwen_jax.generate import left_pad


def layer_statistics(experts: np.ndarray, weights: np.ndarray, probs: np.ndarray) -> dict:
    """Usage statistics of one MoE layer from its routing on real tokens: experts and weights [N, k], probs
    [N, E]."""
    n_tokens, k = experts.shape
    n_experts = probs.shape[1]
    counts = np.bincount(experts.reshape(-1), minlength=n_experts)
    weight_sums = np.bincount(experts.reshape(-1), weights.reshape(-1), minlength=n_experts)
    load = counts / (n_tokens * k)
    mean_probability = probs.mean(0)
    nonzero = load[load > 0]
    return {
        "counts": counts.tolist(),
        "load": load.tolist(),
        "mean_weight": np.divide(weight_sums, counts, out=np.zeros(n_experts), where=counts > 0).tolist(),
        "mean_probability": mean_probability.tolist(),
        "load_entropy": float(-(nonzero * np.log(nonzero)).sum() / np.log(n_experts)),
        "max_over_mean": float(load.max() * n_experts),
        "unused": int((counts == 0).sum()),
        "load_balancing_loss": float(n_experts * ((counts / n_tokens) * mean_probability).sum()),
    }


def expert_usage(model, prompts) -> dict:
    """Runs the prompts as one left-padded batch and gathers every MoE layer's statistics over real tokens."""
    ids, mask = left_pad([p.ids for p in prompts])
    out = qwen_jax.forward(model, ids, mask, return_hidden_states=True)
    real = mask.reshape(-1) > 0  # routing is over the flattened [B * L] tokens
    layers = []
    for index, routing in enumerate(out.routing):
        experts = np.asarray(routing.experts)[real]
        weights, probs = (np.asarray(x, np.float64)[real] for x in (routing.weights, routing.probs))
        layers.append({"layer": index, **layer_statistics(experts, weights, probs)})
    return {
        "num_experts": model.cfg.num_experts,
        "experts_per_token": model.cfg.num_experts_per_tok,
        "tokens": int(real.sum()),
        "prompts": [{"name": p.name, "tokens": len(p.ids)} for p in prompts],
        "layers": layers,
    }


def usage_figure(results: dict):
    """A heatmap of each layer's load per expert, and each layer's load entropy and max/mean load."""
    from matplotlib.figure import Figure

    load = np.array([layer["load"] for layer in results["layers"]])
    n_layers, n_experts = load.shape
    fig = Figure(figsize=(max(6.0, 0.4 * n_experts + 2), 2.2 + 0.45 * n_layers + 2.4))
    heat, balance = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(n_layers, 3), 3]})
    image = heat.imshow(load, aspect="auto", cmap="viridis", vmin=0)
    heat.set_xlabel("expert")
    heat.set_ylabel("layer")
    heat.set_xticks(range(n_experts))
    heat.set_yticks(range(n_layers))
    heat.set_title(
        f"share of routed (token, slot) choices per expert: {results['tokens']} tokens, "
        f"top-{results['experts_per_token']} of {n_experts}"
    )
    fig.colorbar(image, ax=heat, label="load")
    layers = np.arange(n_layers)
    balance.plot(layers, [x["load_entropy"] for x in results["layers"]], "o-", label="load entropy / log(E)")
    balance.set_ylim(0, 1.05)
    balance.set_xlabel("layer")
    balance.set_xticks(layers)
    twin = balance.twinx()
    twin.plot(
        layers, [x["max_over_mean"] for x in results["layers"]], "s--", color="C3", label="max / mean load"
    )
    twin.set_ylabel("max / mean load")
    balance.legend(loc="lower left")
    twin.legend(loc="lower right")
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "expert-usage")
    parser.add_argument("--prompts", type=Path, help="JSONL prompts, as for `python -m audit compare`")
    args = parser.parse_args(argv)
    checkpoint = checkpoint_dir(args.checkpoint)
    prompts = render_prompts(checkpoint, args.prompts)
    results = {"checkpoint": str(checkpoint), "dtype": args.dtype}
    results |= expert_usage(qwen_jax.load_hf(checkpoint, args.dtype), prompts)
    write_results(args.out, "expert_usage", results, usage_figure(results))
    for layer in results["layers"]:
        print(
            f"layer {layer['layer']}: load entropy {layer['load_entropy']:.3f}, max/mean {layer['max_over_mean']:.2f}, "
            f"unused {layer['unused']}"
        )
    print(f"wrote {args.out}/expert_usage.json and expert_usage.png")


if __name__ == "__main__":
    sys.exit(run(main))
