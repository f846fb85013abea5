"""Packed pretraining data: a split's documents tokenized once into one flat stream file (BOS doc EOS
...), and the deterministic sampler that cuts `seq + 1`-token windows from such streams, visits them
in a fresh random order every epoch and mixes domain and general sources by a given fraction."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from slmforge.artifacts import Artifact
from slmforge.errors import UserError
from slmforge.records import read_documents


def tokenize_split(tokenizer, curate: Artifact, split: str, source: str, path: Path) -> int:
    """Write the split's documents as one token stream (BOS doc EOS ...) to `path`; returns its length."""
    if path.is_file():
        return int(np.load(path, mmap_mode="r").shape[0])
    texts = [r["text"] for r in read_documents(curate.path / "data" / split, source, columns=["text"])]
    return tokenize_texts(tokenizer, texts, source, path)


def tokenize_sources(tokenizer, curate: Artifact, sources: list[str], folder: Path) -> None:
    """Every source's train and val split as token streams, folder/<source>.<split>.npy."""
    for s in sources:
        for split in ("train", "val"):
            tokenize_split(tokenizer, curate, split, s, folder / f"{s}.{split}.npy")


def tokenize_texts(tokenizer, texts: list[str], source: str, path: Path) -> int:
    """Write texts as one token stream (BOS text EOS ...) to `path`; returns its length."""
    if path.is_file():
        return int(np.load(path, mmap_mode="r").shape[0])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"pretrain: the tokenizer of {source} is not a fast (tokenizers) tokenizer")
    chunks = []
    for i in range(0, len(texts), 256):
        for e in tokenizer.backend_tokenizer.encode_batch(texts[i:i + 256], add_special_tokens=False):
            chunks.append(np.asarray([bos, *e.ids, eos], dtype=np.int64))
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    arr = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return int(arr.shape[0])


class Sampler:
    """Deterministic packed-window sampler over several sources with a domain-fraction schedule. Within
    the domain (or general) group a source is drawn in proportion to its size, except the sources in
    `shares`, which get that share of their group's draws (pretrain.reading)."""

    def __init__(self, streams: dict[str, np.ndarray], domain: list[str], seq: int, seed: int,
                 shares: dict[str, float] | None = None):
        self.streams, self.seq, self.seed = streams, seq, seed
        self.shares = dict(shares or {})
        self.names = sorted(streams)
        self.windows = {s: max(0, (len(a) - 1) // seq) for s, a in streams.items()}
        self.domain = [s for s in self.names if s in domain and self.windows[s]]
        self.general = [s for s in self.names if s not in domain and self.windows[s]]
        self.consumed = {s: 0 for s in self.names}
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def state(self) -> dict:
        return {"consumed": dict(self.consumed)}

    def load(self, state: dict) -> None:
        self.consumed = dict(state["consumed"])

    def epochs(self, group: list[str]) -> float:
        total = sum(self.windows[s] for s in group)
        return sum(self.consumed[s] for s in group) / total if total else 0.0

    def _window(self, source: str) -> np.ndarray:
        k = self.consumed[source]
        n = self.windows[source]
        epoch, i = divmod(k, n)
        cached = self._perm.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, self.names.index(source), epoch])
            cached = (epoch, rng.permutation(n))
            self._perm[source] = cached
        start = int(cached[1][i]) * self.seq
        self.consumed[source] = k + 1
        return np.asarray(self.streams[source][start:start + self.seq + 1], dtype=np.int64)

    def _cdf(self, group: list[str]) -> np.ndarray:
        """The cumulative probability of each source of a group: fixed shares, the rest by size."""
        sizes = np.array([self.windows[s] for s in group], dtype=float)
        fixed = {s: self.shares[s] for s in group if s in self.shares}
        if not fixed:
            return np.cumsum(sizes) / sizes.sum()
        rest = sum(n for s, n in zip(group, sizes) if s not in fixed)
        if not rest:
            w = np.array([fixed[s] for s in group])
            return np.cumsum(w) / w.sum()
        left = 1.0 - sum(fixed.values())
        return np.cumsum([fixed[s] if s in fixed else left * n / rest for s, n in zip(group, sizes)])

    def batch(self, step: int, n_seq: int, p_domain: float) -> np.ndarray:
        """The global batch of `step`: n_seq windows, each from the domain with probability p_domain."""
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        draws, picks = rng.random(n_seq), rng.random(n_seq)
        rows = []
        for d, u in zip(draws, picks):
            group = self.domain if (d < p_domain and self.domain) or not self.general else self.general
            source = group[int(np.searchsorted(self._cdf(group), u, side="right").clip(0, len(group) - 1))]
            rows.append(self._window(source))
        return np.stack(rows)
