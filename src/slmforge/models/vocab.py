"""Vocabulary expansion: give a pretrained base the domain tokenizer's most useful tokens.

A base such as SmolLM2 spends several tokens on a domain term (" autovacuum" is 3 to 6 pieces) that
slmforge's domain tokenizer emits as one. `choose_tokens` ranks the domain tokenizer's tokens by how many
base tokens they would save on the domain text; `expand` adds the best N to the base tokenizer, grows the
model's embeddings and starts each new row as the mean of its pieces' rows, so that before any training
the new token "means" roughly what its pieces meant together (the usual initialisation, e.g. Gee et al.
2022, "Fast vocabulary transfer"), while every old row, and so the model's output on old ids, stays
bit-identical. Continued pretraining (DAPT) then teaches the new rows.

Both tokenizers are byte-level BPE over the GPT-2 byte alphabet (slmforge's `train_bpe`, SmolLM2, Llama 3):
a token's vocabulary string is in that alphabet ("Ġautovacuum", with `Ġ` for the leading space), and its
text is what `decode` gives (" autovacuum"). We compare tokens in the byte-level form and re-encode the
text with the base, so a token is only taken when its text round-trips to exactly its bytes.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Candidate:
    """A domain token worth adding: its byte-level string, its text, the base ids it replaces, how often
    the domain tokenizer emits it on the texts, and the base tokens it saves there ((pieces - 1) x count)."""

    token: str
    text: str
    pieces: tuple[int, ...]
    count: int
    savings: int


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token of `texts` (no special tokens): higher means the tokenizer compresses better."""
    n_bytes = n_tokens = 0
    for batch in _batches(texts):
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(ids) for ids in _encode(tokenizer, batch))
    return round(n_bytes / max(n_tokens, 1), 4)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without BOS/EOS, through the fast (Rust) tokenizer in one batch."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def _batches(texts: Iterable[str], size: int = 256) -> Iterable[list[str]]:
    """`texts` a few hundred at a time, so that a whole train split is never held as token ids at once."""
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def choose_tokens(base_tokenizer, domain_tokenizer, texts: Iterable[str], n: int) -> list[Candidate]:
    """The `n` tokens of `domain_tokenizer` that save the most base tokens on `texts`, best first.

    A candidate is a token the domain tokenizer emits on `texts`, that is not special, not already in the
    base vocabulary (as a token or an added token), whose text the base tokenizer splits into two or more
    pieces that spell exactly the token's bytes (a token that is half of a UTF-8 character decodes to
    U+FFFD and is skipped), and that the base pre-tokenizer keeps as one piece (a BPE merge never crosses
    a pre-token boundary, so such a token could never be produced). Ties are broken by the token string,
    so the choice is deterministic. Fewer than `n` are returned when there are fewer candidates."""
    if n <= 0:
        return []
    counts: Counter[int] = Counter()
    for batch in _batches(texts):
        counts.update(i for ids in _encode(domain_tokenizer, batch) for i in ids)
    special = set(domain_tokenizer.all_special_ids) | {
        i for i, t in domain_tokenizer.added_tokens_decoder.items() if t.special}
    base_vocab = base_tokenizer.get_vocab()  # byte-level strings of the model vocab and added tokens' contents
    base_added = {t.content for t in base_tokenizer.added_tokens_decoder.values()}
    base_backend = base_tokenizer.backend_tokenizer
    pre = base_backend.pre_tokenizer
    out = []
    for i, count in counts.items():
        token = domain_tokenizer.convert_ids_to_tokens(i)
        if i in special or token in base_vocab:
            continue
        text = domain_tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if not text or text in base_added:
            continue
        enc = base_backend.encode(text, add_special_tokens=False)
        if len(enc.ids) < 2 or "".join(enc.tokens) != token:
            continue  # one piece already, or the text does not re-encode to the token's bytes
        if pre is not None and len(pre.pre_tokenize_str(text)) != 1:
            continue
        out.append(Candidate(token, text, tuple(enc.ids), count, (len(enc.ids) - 1) * count))
    out.sort(key=lambda c: (-c.savings, c.token))
    return out[:n]


# Why real BPE merges and not `tokenizer.add_tokens`: added tokens are matched greedily (leftmost-longest)
# in the raw text before the BPE runs, so a short added token such as "ac" is cut out of the middle of
# ordinary words. Measured at commit 7c8afa3 (no script in benchmarks/ repeats it) with two 1000-token `train_bpe` tokenizers, the base on documents 0-29 of
# data/general/literature_pd, the domain on documents 0-29 of data/postgresql_docs, 500 requested tokens
# (431 candidates), bytes per token on documents 30-39 of each (base: domain 2.051, general 2.998):
# added tokens: domain 2.412, general 2.591 (general text got 16% more tokens);
# merges appended after the base's own: domain 2.544, general 3.097 (both better).
# Appended merges have a lower priority than every base merge, so BPE first reaches the base's own pieces
# and only then joins them; a token of k pieces needs k - 1 merges, and the strings in between (the
# "intermediates") become vocabulary entries too, reported as such and initialised the same way.


def _plan(pieces: list[str], known: set[str]) -> list[tuple[int, int, int]]:
    """Binary merges (i, k, j) joining span [i, k) and [k, j) of `pieces`, children first, that build the
    whole string with the fewest strings not in `known` (each of those costs a new vocabulary row)."""
    n = len(pieces)
    best: dict[tuple[int, int], tuple[int, int]] = {}  # span -> (new strings below and at it, split point)
    for width in range(2, n + 1):
        for i in range(n - width + 1):
            j = i + width
            new = 0 if "".join(pieces[i:j]) in known or width == n else 1
            best[i, j] = min((_cost(best, i, k) + _cost(best, k, j) + new, k) for k in range(i + 1, j))
    out: list[tuple[int, int, int]] = []

    def walk(i: int, j: int) -> None:
        if j - i > 1:
            k = best[i, j][1]
            walk(i, k)
            walk(k, j)
            out.append((i, k, j))

    walk(0, n)
    return out


def _cost(best: dict, i: int, j: int) -> int:
    return 0 if j - i == 1 else best[i, j][0]


def _expanded_tokenizer(base_tokenizer, chosen: list[Candidate]):
    """The base tokenizer with the chosen tokens (and the intermediates they need) as BPE vocabulary
    entries and merges; returns it and [(new id, base piece ids)] for every new vocabulary entry."""
    from transformers import AutoTokenizer

    from slmforge.errors import UserError

    tj = json.loads(base_tokenizer.backend_tokenizer.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise UserError(f"vocabulary expansion needs a BPE base tokenizer; this one is {model.get('type')}")
    vocab, merges = model["vocab"], model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json: "a b" strings
    have = {tuple(m.split(" ", 1)) if as_strings else tuple(m) for m in merges}
    next_id = max([*vocab.values(), *base_tokenizer.added_tokens_decoder, len(base_tokenizer) - 1]) + 1
    known = set(vocab) | {c.token for c in chosen}
    rows: list[tuple[int, tuple[int, ...]]] = []
    for c in chosen:
        pieces = base_tokenizer.convert_ids_to_tokens(list(c.pieces))
        if "".join(pieces) != c.token:
            raise UserError(f"vocabulary expansion: {c.text!r} was chosen for another base tokenizer "
                            f"(its pieces spell {''.join(pieces)!r}); run choose_tokens with this base")
        for i, k, j in _plan(pieces, known):
            left, right, whole = "".join(pieces[i:k]), "".join(pieces[k:j]), "".join(pieces[i:j])
            if whole not in vocab:
                vocab[whole] = next_id
                rows.append((next_id, c.pieces[i:j]))
                next_id += 1
                known.add(whole)
            if (left, right) not in have:
                have.add((left, right))
                merges.append(f"{left} {right}" if as_strings else [left, right])
    with tempfile.TemporaryDirectory() as tmp:
        base_tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    got = tok.get_vocab()
    assert all(got.get(t) == i for t, i in vocab.items()), "the expanded vocabulary moved"
    return tok, rows


def expand(model, base_tokenizer, chosen: list[Candidate], texts: Iterable[str] = ()):
    """Add `chosen` (from `choose_tokens`) to `base_tokenizer` and `model`; returns (model, tokenizer, report).

    The model is changed in place: its embeddings grow to the new vocabulary (tied input/output embeddings
    stay tied), each new input row (and output row, if untied) is the mean of its base pieces' rows, and
    every old row is left bit-identical, so on old ids the model computes exactly what it did. The base
    tokenizer is not changed. The report says what was added and, on `texts`, the bytes per token before
    and after, and how many chosen tokens the expanded tokenizer emits for their own text."""
    import torch

    texts = list(texts)
    chosen = list(dict.fromkeys(chosen))  # a token given twice is added once
    report: dict = {"chosen": len(chosen), "added": 0, "intermediates": 0,
                    "vocab_before": len(base_tokenizer), "vocab_after": len(base_tokenizer)}
    if not chosen:
        if texts:
            same = bytes_per_token(base_tokenizer, texts)
            report["bytes_per_token"] = {"base": same, "expanded": same}
        return model, base_tokenizer, report
    tok, rows = _expanded_tokenizer(base_tokenizer, chosen)
    inp = model.get_input_embeddings()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight.data_ptr() == inp.weight.data_ptr()
    old_rows = inp.weight.shape[0]
    if len(tok) > old_rows:
        model.resize_token_embeddings(len(tok), mean_resizing=False)  # copies the old rows unchanged
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    still_tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    assert still_tied == tied, "resizing untied the embeddings"
    matrices = [inp.weight] + ([out.weight] if out is not None and not tied else [])
    with torch.no_grad():
        ids = torch.tensor([i for i, _ in rows], device=inp.weight.device)
        for w in matrices:
            # rows past the old size are new; ids below it would be the base's unused padding rows
            w[ids] = torch.stack([w[list(p)].float().mean(0) for _, p in rows]).to(w.dtype)
    chosen_ids = tok.convert_tokens_to_ids([c.token for c in chosen])
    used = sum(e == [i] for e, i in zip(_encode(tok, [c.text for c in chosen]), chosen_ids))
    report.update(added=len(rows), intermediates=len(rows) - len(chosen), vocab_after=len(tok),
                  tied=tied, chosen_emitted_whole=used,
                  examples=[asdict(c) | {"pieces": list(c.pieces)} for c in chosen[:20]])
    if texts:
        report["bytes_per_token"] = {"base": bytes_per_token(base_tokenizer, texts),
                                     "expanded": bytes_per_token(tok, texts)}
    return model, tok, report
