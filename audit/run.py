"""The two commands, wired from their parts: prompts, the reference side (live or a bundle), the JAX side, the
replay of logged samples, and the report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from audit import demo
from audit.errors import AuditInputError
from audit.journal import Journal
from audit.manifest import checkpoint_digest, combined_sha256, host_info, library_versions
from audit.prompts import (
    PromptSpec,
    TokenizerBundle,
    load_checkpoint_tokenizer,
    prompts_sha256,
    read_prompts_file,
    render_all,
)
from audit.records import Prompt, ReferenceRun

DEFAULT_MAX_NEW_TOKENS = 256
DEMO_SOURCE = "built-in demo"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a command resolves from its arguments: the checkpoint, its tokenizer, the prompts and the budget."""

    checkpoint: Path
    tokens: TokenizerBundle
    prompts: tuple[Prompt, ...]
    prompts_source: str
    dtype: str
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    samples: dict | None = None  # {"files", "source"[, "submission"]} when replaying logged samples

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Inputs:
        checkpoint = _resolve_checkpoint(args.checkpoint)
        tokens = load_checkpoint_tokenizer(checkpoint)
        samples = _samples(args)
        if args.prompts is not None:
            specs, source = read_prompts_file(args.prompts), str(args.prompts)
        elif samples is not None:
            from audit.replay import select_samples

            specs = [
                PromptSpec(
                    f"{s.task} doc {s.doc_id}",
                    messages=tuple(s.messages()),
                    chat_template_kwargs=_thinking_kwargs(args),
                )
                for f in samples["files"]
                for s in select_samples(f, args.limit, _sample(args))
            ]
            source = samples["source"]
            if not specs:
                raise AuditInputError(f"{source}: no samples to audit (an empty samples file?)")
        elif args.checkpoint is None:
            specs = [PromptSpec(p["name"], messages=tuple(p["messages"])) for p in demo.DEMO_PROMPTS]
            source = DEMO_SOURCE
        else:
            raise AuditInputError(
                "--checkpoint needs prompts: --prompts FILE, --samples FILE... or --submission ZIP"
            )
        default = demo.DEMO_MAX_NEW_TOKENS if source == DEMO_SOURCE else DEFAULT_MAX_NEW_TOKENS
        return cls(
            checkpoint=checkpoint,
            tokens=tokens,
            prompts=tuple(render_all(specs, tokens)),
            prompts_source=source,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens or default,
            stop_token_ids=_stop_token_ids(checkpoint),
            samples=samples,
        )

    @classmethod
    def from_bundle(cls, args: argparse.Namespace, reference: ReferenceRun) -> Inputs:
        """The bundle's prompts, dtype, budget and stop tokens; the checkpoint gives the tokenizer (decoding)."""
        if args.prompts or args.samples or args.submission:
            raise AuditInputError(
                "--reference carries its own prompts; drop --prompts/--samples/--submission"
            )
        manifest = reference.manifest
        max_new_tokens = int(manifest.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if args.max_new_tokens is not None and args.max_new_tokens != max_new_tokens:
            raise AuditInputError(
                f"{args.reference}: recorded with --max-new-tokens {max_new_tokens}, not {args.max_new_tokens}"
            )
        checkpoint = _resolve_checkpoint(args.checkpoint)
        return cls(
            checkpoint=checkpoint,
            tokens=load_checkpoint_tokenizer(checkpoint),
            prompts=reference.prompts,
            prompts_source=f"reference bundle {args.reference}",
            dtype=manifest.get("dtype", args.dtype),
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(manifest.get("stop_token_ids") or _stop_token_ids(checkpoint)),
        )


def _sample(args) -> tuple[int, int] | None:
    """``--sample N --sample-seed S`` as ``(N, S)``, or ``None``."""
    return None if getattr(args, "sample", None) is None else (args.sample, args.sample_seed)


def _thinking_kwargs(args) -> dict:
    """The chat-template keywords of ``--thinking`` (none when not given: the template's default)."""
    return {} if args.thinking is None else {"enable_thinking": args.thinking == "on"}


def _resolve_checkpoint(path: Path | None) -> Path:
    return demo.ensure_demo_checkpoint() if path is None else _checkpoint_dir(path)


def _checkpoint_dir(path: Path) -> Path:
    if not path.is_dir():
        raise AuditInputError(f"{path}: checkpoint directory not found")
    if not (path / "config.json").is_file():
        raise AuditInputError(f"{path}: not an HF checkpoint (no config.json)")
    return path


def _samples(args) -> dict | None:
    from audit.replay import load_samples_files
    from audit.samples import SamplesError, read_submission

    try:
        if getattr(args, "samples", None):
            return {"files": load_samples_files(args.samples), "source": ", ".join(map(str, args.samples))}
        if getattr(args, "submission", None):
            submission = read_submission(args.submission)
            files = [submission.logs.samples[t] for t in sorted(submission.logs.samples)]
            return {"files": files, "source": str(args.submission), "submission": args.submission}
    except SamplesError as exc:
        raise AuditInputError(str(exc)) from None
    return None


def _stop_token_ids(checkpoint: Path) -> tuple[int, ...]:
    from qwen_jax.config import ConfigError, ModelConfig

    try:
        cfg = ModelConfig.from_json(checkpoint / "config.json")
    except ConfigError as exc:
        raise AuditInputError(str(exc)) from None
    if cfg.generation_eos_token_ids:
        return tuple(cfg.generation_eos_token_ids)
    from qwen_jax.generate import DEFAULT_STOP_TOKEN_IDS  # imports JAX: only when needed

    return tuple(DEFAULT_STOP_TOKEN_IDS)


def _contract(
    checkpoint: Path, tokens: TokenizerBundle, prompts: Sequence[Prompt], dtype: str, seed: int, max_new: int
) -> dict:
    digests = checkpoint_digest(checkpoint)
    return {
        "dtype": dtype,
        "seed": seed,
        "max_new_tokens": max_new,
        "checkpoint": str(checkpoint),
        "checkpoint_files": digests,
        "checkpoint_sha256": combined_sha256(digests),
        "tokenizer_sha256": tokens.tokenizer_sha256,
        "chat_template_sha256": tokens.template_sha256,
        "prompts_sha256": prompts_sha256(prompts),
    }


def _record_live(inputs: Inputs, args, journal=None) -> ReferenceRun:
    try:
        from audit.reference import record_reference
    except ImportError as exc:
        raise AuditInputError(
            f"the PyTorch reference needs torch and transformers ({exc}); install the `reference` extra or pass "
            "--reference BUNDLE"
        ) from None
    contract = _contract(
        inputs.checkpoint, inputs.tokens, inputs.prompts, inputs.dtype, args.seed, inputs.max_new_tokens
    )
    return record_reference(
        inputs.checkpoint,
        inputs.prompts,
        dtype=inputs.dtype,
        max_new_tokens=inputs.max_new_tokens,
        seed=args.seed,
        stop_token_ids=inputs.stop_token_ids,
        manifest={**contract, "stop_token_ids": list(inputs.stop_token_ids)},
        progress=not args.no_progress,
        journal=journal,
        hidden_states=_hidden_states(args),
    )


def _hidden_states(args, reference: ReferenceRun | None = None) -> int:
    """``--hidden-states N`` (default :data:`audit.records.DEFAULT_HIDDEN_STATES`), or a bundle's own N."""
    from audit.records import DEFAULT_HIDDEN_STATES

    if reference is None:
        return DEFAULT_HIDDEN_STATES if args.hidden_states is None else args.hidden_states
    if args.hidden_states is not None:
        raise AuditInputError(
            f"{args.reference}: a bundle keeps the hidden states it was recorded with; drop --hidden-states"
        )
    return int(reference.manifest.get("hidden_states", 0))


def record(args) -> int:
    from audit.records import MANIFEST, bundle_size, save_bundle

    if args.out.exists() and not (args.out / MANIFEST).is_file():
        raise AuditInputError(f"{args.out}: exists and is not a reference bundle; refusing to overwrite it")
    inputs = Inputs.from_args(args)
    preflight(inputs, inputs.checkpoint, live=True)
    for warning in inputs.tokens.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    run = _record_live(inputs, args)
    path = save_bundle(run, args.out, _hidden_states(args))
    size = bundle_size(path)
    print(
        f"reference bundle: {path} ({len(run.prompts)} prompts, {args.dtype}; {size['bytes']:,} bytes, "
        f"{size['per_token_bytes_per_position']:,.0f} bytes per position for every prompt, full hidden states of "
        f"{len(size['full_hidden_states'])})"
    )
    return 0


def jax_mesh(text: str | None, weights: Path):
    """The JAX side's mesh from ``--mesh``: ``none`` -> ``None`` (one device); ``ep=N``/``dp=D,ep=N`` parsed by
    :func:`conversion.plan.parse_mesh`; by default every local device on ``ep`` when there is more than one and
    their number divides the experts, else one device."""
    import jax

    from conversion import UsageError
    from conversion.plan import parse_mesh
    from qwen_jax.config import ModelConfig
    from qwen_jax.sharding import make_mesh

    if text == "none":
        return None
    cfg = ModelConfig.from_json(weights / "config.json")
    devices = jax.local_devices()
    if text is None:
        if len(devices) < 2 or cfg.num_experts % len(devices):
            return None
        return make_mesh(ep=len(devices), devices=devices)
    try:
        axes = parse_mesh(text, cfg)
        return make_mesh(ep=axes["ep"], dp=axes["dp"], devices=devices[: axes["ep"] * axes["dp"]])
    except (UsageError, ValueError) as exc:
        raise AuditInputError(f"--mesh {text}: {exc}" if str(text) not in str(exc) else str(exc)) from None


def validate_hf_checkpoint(path: Path, dtype: str):
    """The project's own strict checks on an HF checkpoint, before transformers or JAX loads it (transformers'
    own errors on a broken checkpoint are tracebacks, and it would hand a pickle file to ``torch.load``): the
    files (pickle-only directories refused, never unpickled; shards of the index present), every safetensors
    header (offsets within the file: truncation), every tensor against config.json (shape, float dtype, each
    parameter set exactly once), then every tensor's values, read one at a time, for NaN and infinity. The
    conversion plan of :mod:`conversion.layout` does the header part; returns it."""
    from conversion.layout import build_plan
    from qwen_jax.safetensors_io import read_tensor

    plan = build_plan(path, dtype)
    for leaf in plan.leaves:
        for source in leaf.sources:
            read_tensor(path, source.tensor)  # CheckpointError naming the tensor and file on NaN or inf
    return plan


def _weights_bytes(weights: Path, dtype: str, plan) -> int:
    """Bytes of the JAX side's weights in ``dtype``: from the validation plan, or an Orbax manifest's shapes."""
    import math

    import numpy as np

    from qwen_jax.checkpoint import read_manifest
    from qwen_jax.model import resolve_dtype

    if plan is not None:
        return sum(leaf.nbytes for leaf in plan.leaves)
    itemsize = np.dtype(resolve_dtype(dtype)).itemsize
    return sum(math.prod(entry["shape"]) for entry in read_manifest(weights)["leaves"]) * itemsize


def preflight(inputs: Inputs, weights: Path, live: bool, batch_size: int | None = 1) -> int:
    """Everything that can be checked before either side runs, cheapest first: each prompt plus the new tokens
    within the model's context; the JAX weights directory (an Orbax conversion in bfloat16 is refused for a float32
    audit); the strict checkpoint validation (:func:`validate_hf_checkpoint`) of the checkpoint the reference loads
    (``live``) and of HF weights for the JAX side; and the memory the JAX run needs (its weights plus, per row of a
    batch, the decode state and the teacher-forced outputs: :func:`audit.batching.row_bytes`) against what is free.
    Returns the JAX side's batch size: ``batch_size``, or when ``None`` the memory plan's
    (:func:`audit.batching.default_batch_size`)."""
    from qwen_jax.config import ConfigError, ModelConfig
    from qwen_jax.limits import check_context, check_memory, free_memory_bytes

    try:
        cfg = ModelConfig.from_json(
            weights / "config.json" if weights.is_dir() else inputs.checkpoint / "config.json"
        )
    except ConfigError as exc:
        raise AuditInputError(str(exc)) from None
    for prompt in inputs.prompts:
        check_context(
            len(prompt.ids), inputs.max_new_tokens, cfg.max_position_embeddings, f"prompt {prompt.name!r}"
        )
    if not weights.is_dir():
        raise AuditInputError(f"{weights}: JAX checkpoint directory not found")
    from qwen_jax.checkpoint import is_converted

    orbax = is_converted(weights)
    if orbax:
        from qwen_jax.checkpoint import read_manifest

        stored = read_manifest(weights)["dtype"]
        if stored == "bfloat16" and inputs.dtype == "float32":
            raise AuditInputError(
                f"{weights}: holds bfloat16 weights (manifest.json) but the audit runs in float32: the JAX side "
                "would compare bf16-rounded weights with the float32 reference; convert with --dtype float32 or "
                "audit with --dtype bfloat16"
            )
    plan = validate_hf_checkpoint(inputs.checkpoint, inputs.dtype) if live else None
    if not orbax and (plan is None or weights.resolve() != inputs.checkpoint.resolve()):
        plan = validate_hf_checkpoint(weights, inputs.dtype)
    import jax.numpy as jnp

    from audit.batching import default_batch_size, row_bytes

    dtype = jnp.dtype(inputs.dtype)
    longest = max(len(p.ids) for p in inputs.prompts)
    weights_bytes = _weights_bytes(weights, inputs.dtype, None if orbax else plan)
    free, where = free_memory_bytes()
    if batch_size is None:
        batch_size = default_batch_size(cfg, dtype, longest, inputs.max_new_tokens, weights_bytes, free)
    batch = min(batch_size, len(inputs.prompts))
    need = weights_bytes + batch * row_bytes(cfg, dtype, longest, inputs.max_new_tokens)
    check_memory(
        need,
        free,
        where,
        f"the run ({batch} prompt(s) a batch of up to {longest + inputs.max_new_tokens} tokens: the weights, the "
        "decode state and the teacher-forced outputs)",
    )
    return batch_size


def _jax_manifest(weights: Path, inputs_like: dict, mesh=None) -> dict:
    import os

    import jax

    devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    device = devices[0]
    return {
        **inputs_like,
        "side": "jax",
        "framework": "jax",
        "versions": library_versions(("jax", "jaxlib", "flax", "numpy", "orbax-checkpoint", "tokenizers")),
        "device": f"{device.platform}: {device.device_kind} x {len(devices)}",
        "devices": [str(d) for d in devices],
        "mesh": None if mesh is None else dict(mesh.shape),
        "host": host_info(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "weights": str(weights),
    }


def _reference_replies(reference: ReferenceRun, jax_run):
    """The reference's greedy ids per prompt, and whether the JAX side's divergence from them is a near-tie."""
    from audit.replay import ReferenceReplies

    generated, near_tie = {}, {}
    for prompt, ref, divergence in zip(
        reference.prompts, reference.sequences, jax_run.divergences, strict=True
    ):
        generated[tuple(prompt.ids)] = [int(t) for t in ref.generated]
        if divergence is not None:
            near_tie[tuple(prompt.ids)] = divergence.classification == "near-tie"
    return ReferenceReplies(generated=generated, near_tie=near_tie)


def _replay(inputs: Inputs, args, model, jax_run, reference: ReferenceRun, batch_size: int) -> dict | None:
    """The replay of logged samples, reusing the JAX greedy outputs already made for the same prompts (any other is
    generated in bucketed batches of ``batch_size``)."""
    if inputs.samples is None:
        return None
    from audit import jax_side
    from audit.batching import bucket_length
    from audit.replay import replay_samples, replay_submission
    from audit.samples import SamplesError

    # The JAX side's greedy tokens of every prompt at the full budget: a prompt's tokens under a smaller budget are
    # their prefix (greedy, batch-invariant: the decode state's length changes nothing), as the replay cuts them.
    done = {
        tuple(p.ids): list(s.generated) for p, s in zip(reference.prompts, jax_run.sequences, strict=True)
    }
    budget = {tuple(p.ids): inputs.max_new_tokens for p in reference.prompts}

    def generate(prompts, max_new_tokens):
        missing = [p for p in prompts if budget.get(tuple(p), 0) < max_new_tokens]
        if missing:
            tokens = jax_side.greedy(model, missing, max_new_tokens, inputs.stop_token_ids, batch_size)
            for p, out in zip(missing, tokens, strict=True):
                done[tuple(p)], budget[tuple(p)] = list(out), max_new_tokens
        return [done[tuple(p)] for p in prompts]

    kwargs = dict(
        tokenizer=inputs.tokens.tokenizer,
        chat_template=inputs.tokens.template,
        generate=generate,
        max_new_tokens=inputs.max_new_tokens,
        stop_token_ids=inputs.stop_token_ids,
        batch_size=batch_size,
        bucket=bucket_length,
        limit=args.limit,
        sample=_sample(args),
        reference=_reference_replies(reference, jax_run),
    )
    if args.reasoning_split:
        kwargs["reasoning_split"] = args.reasoning_split
    kwargs |= _thinking_kwargs(args)
    try:
        if "submission" in inputs.samples:
            result = replay_submission(inputs.samples["submission"], **kwargs)
        else:
            result = replay_samples(inputs.samples["files"], **kwargs)
    except (SamplesError, ValueError) as exc:
        raise AuditInputError(str(exc)) from None
    return result.to_json()


def compare(args, version: str) -> int:
    import contextlib

    import jax

    from audit import jax_side
    from audit.compare import build_report
    from audit.records import load_bundle
    from audit.report import terminal_summary, write_report

    if args.reference is not None:
        reference = load_bundle(args.reference)
        _hidden_states(args, reference)  # --hidden-states with a bundle: refused before any work
        inputs = Inputs.from_bundle(args, reference)
    else:
        inputs = Inputs.from_args(args)
        reference = None
    weights = inputs.checkpoint if args.jax_checkpoint is None else args.jax_checkpoint
    batch_size = preflight(inputs, weights, live=reference is None, batch_size=args.batch_size)
    contract = _contract(
        weights, inputs.tokens, inputs.prompts, inputs.dtype, args.seed, inputs.max_new_tokens
    )
    settings = _settings(inputs, args, reference)
    journal = Journal.open(args.report, _journal_header(inputs, args, contract, settings, reference))
    if reference is None:
        reference = _record_live(inputs, args, journal)
    mesh = jax_mesh(args.mesh, weights if weights.is_dir() else inputs.checkpoint)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        from qwen_jax.checkpoint import load_model_dir

        model = load_model_dir(weights, inputs.dtype, mesh)
        jax_run = jax_side.run_jax(
            model,
            reference,
            max_new_tokens=inputs.max_new_tokens,
            stop_token_ids=inputs.stop_token_ids,
            batch_size=batch_size,
            teacher_forced_bytes=_teacher_forced_bytes(),
            progress=not args.no_progress,
            journal=journal,
        )
        replay = _replay(inputs, args, model, jax_run, reference, batch_size)
        recompute = _diverging_without_full_states(inputs, args, reference, jax_run)
        jax_run, recompute_warnings = jax_side.recompute_hidden(
            model, reference, jax_run, [i for i in recompute if jax_run.sequences[i].hidden is None]
        )
    layer_types = model.cfg.layer_types
    del model  # before the reference may be loaded again
    reference, warnings = _reference_full_states(inputs, reference, recompute)
    recompute_warnings += warnings
    report = build_report(
        reference=reference,
        jax_run=jax_run,
        settings=settings,
        jax_manifest={**_jax_manifest(weights, contract, mesh), "batching": jax_run.batching},
        layer_types=layer_types,
        decode=lambda ids: inputs.tokens.tokenizer.decode([int(t) for t in ids]),
        tool_version=version,
        replay=replay,
        warnings=[*inputs.tokens.warnings, *recompute_warnings],
    )
    for difference in report["manifest"]["differences"]:
        print(
            f"WARNING: the reference was run with {difference['key']} = {difference['reference']!r}, this run has "
            f"{difference['jax']!r}",
            file=sys.stderr,
        )
    paths = write_report(report, args.report)
    print(terminal_summary(report))
    print(batching_summary(jax_run.batching))
    print(f"report: {paths.html} and {paths.json}")
    return report["verdict"]["exit_code"]


def _teacher_forced_bytes() -> int | None:
    """What one teacher-forced batch's outputs may take: a quarter of the memory free now (the weights loaded)."""
    from qwen_jax.limits import free_memory_bytes

    free, _ = free_memory_bytes()
    return None if free is None else free // 4


def batching_summary(batching: dict) -> str:
    """One terminal line: the JAX side's batch size, buckets and compiled programs."""
    programs = ", ".join(
        f"{name.split('.')[-1].strip('_')} {n}" for name, n in batching["compiled_programs"].items()
    )
    return (
        f"jax batching: batch size {batching['batch_size']}, {batching['greedy_batches']} greedy batches in "
        f"{len(batching['greedy_buckets'])} bucket(s), {batching['teacher_forced_batches']} teacher-forced batches "
        f"in {len(batching['teacher_forced_buckets'])}; compiled programs {batching['compiled_programs_total']}"
        + (f" ({programs})" if programs else "")
    )


def _diverging_without_full_states(inputs: Inputs, args, reference: ReferenceRun, jax_run) -> list[int]:
    """With a live reference, the diverging prompts whose full hidden states one side or both did not keep: they
    are recomputed (the JAX side's by :func:`audit.jax_side.recompute_hidden`, the reference's by
    :func:`audit.reference.recompute_hidden`). A bundle's are not (the report then says they were not kept)."""
    from audit.compare import full_states_needed

    return [] if args.reference is not None else full_states_needed(reference, jax_run, inputs.dtype)


def _reference_full_states(inputs: Inputs, reference: ReferenceRun, indices: Sequence[int]):
    """``reference`` with the full hidden states of prompts ``indices`` that it did not keep recomputed."""
    missing = [i for i in indices if reference.sequences[i].hidden is None]
    if not missing:
        return reference, []
    from audit.reference import recompute_hidden

    return recompute_hidden(inputs.checkpoint, inputs.dtype, reference, missing)


def _settings(inputs: Inputs, args, reference: ReferenceRun | None = None) -> dict:
    return {
        "dtype": inputs.dtype,
        "seed": args.seed,
        "max_new_tokens": inputs.max_new_tokens,
        "checkpoint": str(inputs.checkpoint),
        "jax_checkpoint": None if args.jax_checkpoint is None else str(args.jax_checkpoint),
        "prompts_source": inputs.prompts_source,
        "reference_source": "live" if args.reference is None else "bundle",
        "reasoning_split": args.reasoning_split,
        "sample": None if _sample(args) is None else {"n": args.sample, "seed": args.sample_seed},
        "hidden_states": _hidden_states(args, reference),
    }


def _journal_header(inputs: Inputs, args, contract: dict, settings: dict, reference) -> dict:
    """What makes a rerun the same run: the JAX side's contract (checkpoint, tokenizer, template and prompt
    digests, dtype, seed, budget), the reference's checkpoint digest (or the bundle's), and the settings."""
    if reference is None:
        digest = combined_sha256(checkpoint_digest(inputs.checkpoint))
    else:
        digest = reference.manifest.get("checkpoint_sha256")
    return {"contract": contract, "reference_checkpoint_sha256": digest, "settings": settings}
