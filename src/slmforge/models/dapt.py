"""Continued pretraining (DAPT) from a pretrained base: where `pretrain.init_from` points, and vocabulary
expansion of the base before training (vocab.py does the work)."""

from __future__ import annotations

from pathlib import Path

from slmforge.console import info


def init_source(init_from: str) -> tuple[Path, dict]:
    """(folder, what the manifest records) of `init_from`: a base by name (converted on first use), or a
    folder."""
    from slmforge.models import bases

    name = bases.base_name(init_from)
    if name is None:
        return Path(init_from), {"path": init_from}
    b = bases.get(name)
    return b.path, {"base": b.name, "sha256": b.sha256, "params": b.params, "pretrain_tokens": b.pretrain_tokens,
                    "pretrain_flops": b.pretrain_flops, "quantized": b.quantized}


def expand_vocabulary(model, tokenizer, domain_tokenizer: Path, train: list[str], val: list[str], n: int):
    """(model, tokenizer, report): the base with the `n` tokens of the domain tokenizer that save most base
    tokens on `train`; the report has bytes per token on `val` before and after."""
    from transformers import AutoTokenizer

    from slmforge.models import vocab

    domain_tok = AutoTokenizer.from_pretrained(str(domain_tokenizer), local_files_only=True)
    chosen = vocab.choose_tokens(tokenizer, domain_tok, train, n)
    model, tokenizer, report = vocab.expand(model, tokenizer, chosen, texts=val)
    report.pop("examples", None)
    bpt = report.get("bytes_per_token", {})
    info(f"  pretrain · expand_vocab: {report['chosen']} domain tokens ({report['added']} rows with the merges' "
         f"intermediates); domain val bytes per token {bpt.get('base', 0):.3f} -> {bpt.get('expanded', 0):.3f}")
    return model, tokenizer, report
