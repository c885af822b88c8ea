"""The PyTorch side: transformers' Qwen3_5MoeForCausalLM run as the reference (needs the ``reference`` extra).

For each prompt (batch 1, as the audited run): greedy ``generate``, then one teacher-forced forward over the prompt
and those tokens with every hidden state and the router logits. The hidden states are reduced to their per-position
summaries at once (:func:`audit.metrics.summarise_hidden`) and kept whole only for the first ``hidden_states``
prompts; :func:`recompute_hidden` gives them back for a prompt that diverges. In a dtype other than float32 the same
forward is repeated on a float32 copy of the model: how far the reference is from itself across precisions is what
calibrates the tolerances (see :mod:`audit.compare`). The greedy determinism checks run on a bounded subset of
the prompts (:func:`audit.determinism.check_subset`, named in the manifest's ``determinism_check``).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import Qwen3_5MoeForCausalLM

from audit import determinism, metrics
from audit.manifest import host_info, library_versions
from audit.records import (
    DEFAULT_HIDDEN_STATES,
    Prompt,
    ReferenceRun,
    SequenceRecord,
    record_arrays,
    record_from_arrays,
    with_recomputed_hidden,
)


def load_reference_model(checkpoint: Path, dtype: str):
    """The HF model as the reference run loads it: eager attention and eager experts (no fused kernels); with CUDA,
    spread over the GPUs by transformers' ``device_map="auto"`` (inputs go to ``model.device``, its first device).
    The CUDA path is not tested here (no GPU in the test environment)."""
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = Qwen3_5MoeForCausalLM.from_pretrained(
        checkpoint,
        dtype=getattr(torch, dtype),
        attn_implementation="eager",
        experts_implementation="eager",
        **placement,
    )
    return model.eval()


def reference_devices() -> list[str]:
    """The devices the reference runs on (the manifest's ``devices``)."""
    if torch.cuda.is_available():
        return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_token_ids: Sequence[int]):
    """HF ``generate(do_sample=False)`` of a left-padded batch; the generated tokens of each row, stop included."""
    width = max(len(p) for p in prompts)
    pad = stop_token_ids[0]
    ids = torch.tensor(
        [[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=model.device
    )
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=model.device
    )
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    rows = []
    for row in out[:, width:].cpu().numpy():
        stops = np.nonzero(np.isin(row, stop_token_ids))[0]
        rows.append(row[: stops[0] + 1] if len(stops) else row)
    return [np.asarray(r, np.int32) for r in rows]


def teacher_forced(model, tokens: np.ndarray):
    """(logits [T, V] float32, hidden [n_states, T, H] float32, router logits [n_layers, T, E] float32)."""
    ids = torch.as_tensor(tokens[None], dtype=torch.long, device=model.device)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_router_logits=True, use_cache=False)
    hidden = np.stack([h[0].float().cpu().numpy() for h in out.hidden_states])
    router = np.stack([r.float().cpu().numpy() for r in out.router_logits])
    return out.logits[0].float().cpu().numpy(), hidden, router


def router_top(router_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k+1 experts and their fp32 softmax probabilities, descending, per layer and token."""
    probs = torch.softmax(torch.as_tensor(router_logits, dtype=torch.float32), -1)
    values, ids = torch.topk(probs, k + 1, dim=-1)
    return ids.numpy().astype(np.int32), values.numpy()


def calibrate(model_fp32, sequences: Sequence[SequenceRecord], dtype: str):
    """How far the reference in ``dtype`` is from the reference in float32 on the same tokens (per-layer rel_diff
    exact for the prompts whose full states are kept, estimated from the summaries for the others)."""
    per_prompt, terms = [], []
    for seq in sequences:
        logits32, h32, _ = teacher_forced(model_fp32, seq.tokens)
        per_prompt.append(metrics.per_position_logit_metrics(seq.logits, logits32))
        ours = h32 if seq.hidden is not None else metrics.HiddenStates(None, *metrics.summarise_hidden(h32))
        terms.append(metrics.prompt_layer_terms(seq.hidden_states(), ours))
    layers = metrics.combine_layer_terms(terms)
    return {
        "description": f"reference in {dtype} against the reference in float32, teacher-forced on the same tokens",
        "logits": metrics.summarise_positions(per_prompt),
        "layers": [layer.rel_diff for layer in layers],
    }


def recompute_hidden(
    checkpoint: Path, dtype: str, run: ReferenceRun, indices: Sequence[int]
) -> tuple[ReferenceRun, list[str]]:
    """``run`` with the full hidden states of prompts ``indices`` recomputed (the same teacher-forced forward as
    :func:`record_reference`), and a warning for each prompt whose recomputed states do not give its recorded
    summaries bitwise (the reference's forward is not reproducible there)."""
    model = load_reference_model(checkpoint, dtype)
    sequences, warnings = with_recomputed_hidden(
        run.sequences, indices, lambda i: teacher_forced(model, run.sequences[i].tokens)[1], "reference"
    )
    return dataclasses.replace(run, sequences=sequences), warnings


def record_reference(
    checkpoint: Path,
    prompts: Sequence[Prompt],
    *,
    dtype: str,
    max_new_tokens: int,
    seed: int,
    stop_token_ids: Sequence[int],
    manifest: dict,
    progress: bool = True,
    journal=None,
    hidden_states: int = DEFAULT_HIDDEN_STATES,
) -> ReferenceRun:
    """Runs the reference on every prompt; see the module docstring. The full hidden states are kept for the
    first ``hidden_states`` prompts, the summaries for all. With an :class:`audit.journal.Journal`, each prompt's
    record is journaled as it finishes and the prompts already journaled are not run again."""
    torch.manual_seed(seed)
    model = load_reference_model(checkpoint, dtype)
    model_config = model.config
    k = model_config.num_experts_per_tok
    sequences, bitwise = [], []
    done = {} if journal is None else journal.done("reference")
    for index, prompt in enumerate(
        tqdm(prompts, desc="reference (torch)", disable=not progress, leave=False)
    ):
        if index in done:
            sequences.append(record_from_arrays(done[index]["record"]))
            bitwise.append(tuple(done[index]["bitwise"]))
            continue
        generated = greedy(model, [prompt.ids], max_new_tokens, stop_token_ids)[0]
        tokens = np.concatenate([np.asarray(prompt.ids, np.int32), generated])
        logits, hidden, router = teacher_forced(model, tokens)
        bitwise.append(determinism.run_pair(logits, teacher_forced(model, tokens)[0]))
        ids, probs = router_top(router, k)
        record = SequenceRecord(
            prompt_len=len(prompt.ids),
            tokens=tokens,
            generated=generated,
            hidden=hidden,
            experts=ids[..., :k],
            logits=metrics.logit_view(logits),
            router_ids=ids,
            router_probs=probs,
        )
        sequences.append(record.summarised(keep_hidden=index < hidden_states))
        if journal is not None:
            journal.append(
                "reference",
                index,
                {"record": record_arrays(sequences[-1], keep_hidden=True), "bitwise": bitwise[-1]},
            )
    checks = [determinism.logits_check("reference", bitwise)]
    subset = determinism.check_subset([len(p.ids) for p in prompts], max_new_tokens)
    firsts = [sequences[i].generated for i in subset]
    again = [greedy(model, [prompts[i].ids], max_new_tokens, stop_token_ids)[0] for i in subset]
    checks.append(determinism.greedy_rerun_check("reference", again, firsts, subset))
    batch = None
    if len(subset) > 1:
        batch = greedy(model, [prompts[i].ids for i in subset], max_new_tokens, stop_token_ids)
        checks.append(determinism.batch_check("reference", batch, firsts))
    calibration = None
    if dtype != "float32":
        del model
        calibration = calibrate(load_reference_model(checkpoint, "float32"), sequences, dtype)
    manifest = {
        **manifest,
        "side": "reference",
        "framework": "torch",
        "versions": library_versions(("torch", "transformers", "numpy", "safetensors", "tokenizers")),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "devices": reference_devices(),
        "host": host_info(),
        "torch_threads": torch.get_num_threads(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "hidden_summary": metrics.sketch_spec(model_config.hidden_size),
        "determinism_check": determinism.check_description(subset, max_new_tokens),
    }
    return ReferenceRun(
        prompts=tuple(prompts),
        sequences=tuple(sequences),
        manifest=manifest,
        calibration=calibration,
        determinism=tuple(checks),
        batch_outputs=None if batch is None else tuple(tuple(int(t) for t in b) for b in batch),
    )
