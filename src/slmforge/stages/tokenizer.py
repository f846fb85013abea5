"""tokenizer: a byte-level BPE trained with HF `tokenizers` on the curated train split.

Saved with BOS/EOS/PAD, ChatML special tokens and a chat template, so that
`transformers.AutoTokenizer.from_pretrained(<run>/tokenizer)` loads it offline. For comparison a
general-purpose BPE of the same vocabulary size is trained on the general sources' train split
(`<run>/general_tokenizer`), and both are measured on the domain and general validation text:
fertility (tokens per word) and bytes per token. A domain tokenizer should spend fewer tokens on
domain text; the manifest says by how much.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore, write_json_atomic
from slmforge.config import StageConfig
from slmforge.console import console, info
from slmforge.deploy.gguf import LLAMA_BPE_SPLIT
from slmforge.errors import UserError
from slmforge.models.chat import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    chat_template,
    portable_tokenizer_config,
    strip_generation_marks,
)
from slmforge.records import Curated

NAME = "tokenizer"
INPUTS = ("curate",)

# Llama 3's pre-tokenizer split (the cl100k pattern): digits in groups of at most 3, punctuation runs
# kept apart from words, newlines split off. llama.cpp knows it as the "llama-bpe" pre-tokenizer.
SPLIT_PATTERN = LLAMA_BPE_SPLIT
# The plain inference template: SFT builds the one with {% generation %} marks (chat.training_template)
CHAT_TEMPLATE = strip_generation_marks(chat_template())


class Config(StageConfig):
    """Vocabulary size and which sources the tokenizer learns from."""

    vocab_size: int = Field(8192, ge=300, le=262144, description="tokens in the vocabulary, specials included")
    min_frequency: int = Field(2, ge=1, description="a merge must occur at least this often")
    train_on: list[str] | None = Field(
        None, description="source names to learn from (default: every source with role: domain)")
    general_baseline: bool = Field(True, description="also train a same-size BPE on the general sources, to compare")
    max_train_chars: int | None = Field(
        None, gt=0, description="cap on training text (first documents in id order); None = all of it")


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"curate": store.resolve("curate:latest")}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs["curate"], out), force=force)


def _texts(curated: Curated, split: str, sources: list[str], max_chars: int | None = None) -> Iterator[str]:
    used = 0
    for source in sources:
        for row in curated.documents(split, source, columns=["text"]):
            yield row["text"]
            used += len(row["text"])
            if max_chars and used >= max_chars:
                return


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (tokenizers.Tokenizer) with our special tokens and BOS added on encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=console.is_terminal,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tok


def save_hf(tok, out: Path) -> None:
    """Save as a transformers tokenizer folder (tokenizer.json, tokenizer_config.json, chat template)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    # transformers 5 writes a config transformers 4 (and so older vLLM, TGI) cannot load: rewritten so
    # that both do (chat.portable_tokenizer_config). No model_max_length: the context is the model's,
    # which export writes.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    write_json_atomic(cfg_path, portable_tokenizer_config(cfg, CHAT_TEMPLATE, None))


def measure(tok, texts: list[str]) -> dict:
    """Fertility (tokens per whitespace word) and UTF-8 bytes per token, without special tokens."""
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    n_words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": n_tokens, "words": n_words, "bytes": n_bytes,
            "fertility": round(n_tokens / max(n_words, 1), 4),
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


def _build(cfg: Config, curate: Artifact, out: Path) -> dict:
    curated = Curated.of(curate)
    roles = curated.roles
    domain = cfg.train_on or curated.domain
    general = curated.general
    unknown = [s for s in domain if s not in roles]
    if unknown:
        raise UserError(f"tokenizer.train_on: unknown source(s) {', '.join(unknown)}; the corpus has {', '.join(roles)}")
    eval_sets = {"domain": list(_texts(curated, "val", domain))}
    if not eval_sets["domain"]:
        raise UserError(f"tokenizer: the val split of {', '.join(domain)} is empty; raise curate.val_fraction")
    if general:
        eval_sets["general"] = list(_texts(curated, "val", general))

    tokenizers = {}
    timings = {}
    train_chars: dict[str, int] = {}

    def counted(name: str, texts: Iterator[str]) -> Iterator[str]:
        """The training texts, counting their characters on the way (no second pass over the split)."""
        train_chars[name] = 0
        for t in texts:
            train_chars[name] += len(t)
            yield t

    for name, sources in [("tokenizer", domain)] + ([("general_tokenizer", general)] if general and cfg.general_baseline else []):
        info(f"  tokenizer · training {name} on {', '.join(sources)} (vocab {cfg.vocab_size})")
        t0 = time.perf_counter()
        texts = counted(name, _texts(curated, "train", sources, cfg.max_train_chars))
        tok = train_bpe(texts, cfg.vocab_size, cfg.min_frequency)
        timings[name] = round(time.perf_counter() - t0, 2)
        save_hf(tok, out / name)
        tokenizers[name] = tok

    evals = {name: {text: measure(tok, texts) for text, texts in eval_sets.items() if texts}
             for name, tok in tokenizers.items()}
    metrics = {"vocab_size": tokenizers["tokenizer"].get_vocab_size(), "trained_on": domain,
               "train_chars": train_chars["tokenizer"],
               "train_time_s": timings, "eval": evals}
    if "general_tokenizer" in evals:
        d, g = evals["tokenizer"]["domain"], evals["general_tokenizer"]["domain"]
        # >0: the domain tokenizer needs that much fewer tokens for the same domain text
        metrics["domain_token_saving"] = round(1 - d["tokens"] / g["tokens"], 4)
    _print_table(metrics)
    return metrics


def _print_table(m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"tokenizer (vocab {m['vocab_size']}): tokens per word (fertility) and bytes per token")
    for col in ("tokenizer", "text", "fertility", "bytes/token", "tokens"):
        t.add_column(col)
    for name, per_text in m["eval"].items():
        for text, s in per_text.items():
            t.add_row(name, f"{text} val", f"{s['fertility']:.3f}", f"{s['bytes_per_token']:.2f}", str(s["tokens"]))
    console.print(t)
    if "domain_token_saving" in m:
        console.print(f"the domain tokenizer needs {m['domain_token_saving']:.1%} fewer tokens on domain text "
                      f"than a general BPE of the same size")
