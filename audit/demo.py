"""The built-in demo: a small random checkpoint of the Qwen3.6 architecture (seed 1234) with a tokenizer, and a few
Russian MERA-style chat prompts, so that ``python -m audit compare`` runs out of the box.

The checkpoint has the real layer pattern (3 x Gated DeltaNet + 1 x gated attention, twice), Hv = 2 Hk as in
Qwen3.6, 16 experts of which 4 are routed plus a shared expert, partial RoPE with interleaved mRoPE sections, the
official fused-expert safetensors layout, the Qwen3.6 chat template, and a byte-level BPE trained on the prompts.
It is built with transformers once and cached (``$QWEN_JAX_AUDIT_CACHE``, default ``~/.cache/qwen-jax-audit``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from audit.atomic import atomic_directory
from audit.errors import AuditInputError
from qwen_jax.chat import load_default_chat_template

DEMO_VERSION = 1
DEMO_SEED = 1234
DEMO_MAX_NEW_TOKENS = 24
TOKENIZER_VOCAB = 500
MODEL_VOCAB = 512
DEMO_FIELDS = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=8,
)

#: MERA-style prompts (med: one answer of 4; agro: several of 6) and two free-form ones, as chat messages.
DEMO_PROMPTS = (
    {
        "name": "med_bench-style",
        "messages": [
            {
                "role": "user",
                "content": "Ответь на вопрос по медицине, выбрав один вариант ответа.\n"
                "Вопрос: Какой гормон снижает уровень глюкозы в крови?\n"
                "A. Глюкагон\nB. Инсулин\nC. Адреналин\nD. Кортизол\n"
                "В ответе укажи только букву.",
            }
        ],
    },
    {
        "name": "agro_bench-style",
        "messages": [
            {
                "role": "user",
                "content": "Выбери все правильные ответы.\n"
                "Вопрос: Какие из этих культур относятся к зерновым?\n"
                "A. Пшеница\nB. Картофель\nC. Ячмень\nD. Свёкла\nE. Овёс\nF. Лён\n"
                "Ответ дай буквами через запятую.",
            }
        ],
    },
    {"name": "greeting", "messages": [{"role": "user", "content": "Привет! Как дела?"}]},
    {
        "name": "system-and-long",
        "messages": [
            {"role": "system", "content": "Ты внимательный ассистент агронома."},
            {
                "role": "user",
                "content": "Расскажи подробно, как подготовить почву к посеву озимой пшеницы: "
                "вспашка, внесение удобрений, прикатывание, сроки сева и норма высева. "
                "Учти, что осень была засушливой, а предшественником был подсолнечник.",
            },
        ],
    },
)


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_JAX_AUDIT_CACHE", Path.home() / ".cache" / "qwen-jax-audit"))


def demo_checkpoint_dir() -> Path:
    return cache_root() / f"demo-v{DEMO_VERSION}-seed{DEMO_SEED}"


def _corpus(template: str) -> list[str]:
    texts = [m["content"] for p in DEMO_PROMPTS for m in p["messages"]]
    return [*texts, template, "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"]


def build_demo_checkpoint(directory: Path) -> Path:
    """Builds the demo checkpoint at ``directory`` (written to a temporary sibling, then renamed)."""
    from audit import hf_models  # torch and transformers: the reference side
    from audit.tiny_tokenizer import build_tokenizer_dir

    with atomic_directory(directory) as tmp:
        template = load_default_chat_template()
        tokenizer_config = {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": template,
        }
        build_tokenizer_dir(tmp, _corpus(template), TOKENIZER_VOCAB, tokenizer_config)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        vocab = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
        if max(added.values()) >= MODEL_VOCAB:
            raise RuntimeError(
                f"demo tokenizer has {max(added.values()) + 1} tokens, model vocab {MODEL_VOCAB}"
            )
        model = hf_models.build_hf_model(DEMO_FIELDS, seed=DEMO_SEED, vocab_size=MODEL_VOCAB)
        hf_models.save_checkpoint(model, tmp)
        generation = {"eos_token_id": [added["<|im_end|>"], added["<|endoftext|>"]], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n", encoding="utf-8")
    return directory


def ensure_demo_checkpoint() -> Path:
    """The cached demo checkpoint, built on first use."""
    directory = demo_checkpoint_dir()
    if not (directory / "config.json").is_file():
        try:
            build_demo_checkpoint(directory)
        except ImportError as exc:
            raise AuditInputError(
                f"{directory}: building the demo checkpoint needs torch and transformers ({exc})"
            ) from None
    return directory
