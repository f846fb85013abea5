"""Which specialist should answer a prompt: the router behind `model: "auto"` in `slmforge serve`.

Two routers over the same interface (`scores(prompt) -> {domain: probability}`):
- `TfidfRouter`: character n-gram TF-IDF (scikit-learn `TfidfVectorizer`, analyzer char_wb, 2-4 grams,
  sublinear tf) + `LogisticRegression`, trained on windows of each specialist's domain/train.jsonl cut to
  prompt-like lengths (40-400 characters), since prompts are short and documents are not.
- `BpbRouter`: each specialist's bits on the prompt (a forward pass of its own model); the lowest wins.
  Confidence is the posterior under equal priors, softmax(-bits x ln 2): the probability that the prompt came
  from that specialist's distribution. Needs no training data, but runs every model on every prompt.
`benchmarks/router.py` compares both on held-out documents (accuracy per domain, full text and the first
200 characters) and latency; serve defaults to the one it measures better (see DEFAULT_KIND).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from slmforge.errors import UserError

# benchmarks/router.py --workdir runs/demo-fresh (dpo specialist, postgres, vs the generalist, general; 42 + 124
# held-out documents; 2 CPU threads, idle machine): TF-IDF routed 99.4% of full documents and 100% of their first
# 200 characters right, in 4.3 ms per prompt (fit 3.8 s at start); bpb 98.8% / 99.4% in 29 ms per prompt (every
# model runs on every prompt, so the cost grows with their size and number). TF-IDF wins on both, so it is the
# default; bpb remains for models without domain data.
DEFAULT_KIND = "tfidf"
KINDS = ("tfidf", "bpb")
PROMPT_CUT = 200  # characters: routing accuracy is also reported on prompts cut to this length


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The "text" of each line of a .jsonl file (blank lines skipped); UserError naming the line if bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: router data file not found; re-export the model (slmforge export) or serve "
                        f"with router kind bpb, which needs no data")
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field per line") from None
            if isinstance(text, str) and text.strip():
                out.append(text)
            if limit is not None and len(out) >= limit:
                break
    return out


def prompt_windows(texts: list[str], per_doc: int = 4, seed: int = 0,
                   lengths: tuple[int, int] = (40, 400)) -> list[str]:
    """Prompt-sized pieces of documents: each document's start plus `per_doc - 1` random windows."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        t = t.strip()
        out.append(t[: rng.randint(*lengths)])
        for _ in range(per_doc - 1):
            n = rng.randint(*lengths)
            if len(t) <= n:
                break
            start = rng.randrange(0, len(t) - n)
            out.append(t[start: start + n])
    return out


class TfidfRouter:
    """Character n-gram TF-IDF + logistic regression over domains."""

    kind = "tfidf"

    def __init__(self, max_features: int = 100_000, c: float = 4.0, seed: int = 0):
        self.max_features, self.c, self.seed = max_features, c, seed
        self.domains: list[str] = []
        self.fit_s = 0.0

    def fit(self, train: dict[str, list[str]], per_doc: int = 4) -> TfidfRouter:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        empty = [d for d, texts in train.items() if not texts]
        if empty:
            raise UserError(f"router: no training text for domain(s) {', '.join(empty)}; check the models' "
                            f"domain/train.jsonl or use router kind bpb")
        t0 = time.perf_counter()
        x, y = [], []
        for domain, texts in train.items():
            pieces = prompt_windows(texts, per_doc, self.seed)
            x += pieces
            y += [domain] * len(pieces)
        self.pipe = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2,
                            max_features=self.max_features, dtype=np.float32),
            LogisticRegression(C=self.c, max_iter=2000, class_weight="balanced"),
        )
        self.pipe.fit(x, y)
        self.domains = [str(c) for c in self.pipe.classes_]
        self.fit_s = time.perf_counter() - t0
        return self

    def scores(self, prompt: str) -> dict[str, float]:
        p = self.pipe.predict_proba([prompt])[0]
        return {d: float(v) for d, v in zip(self.domains, p)}


def text_bits(model, tok, text: str, max_tokens: int) -> float:
    """Total bits the model spends on `text` (its first `max_tokens` tokens, BOS as context)."""
    import torch

    from slmforge.models.lm import nll

    ids = tok(text, return_tensors="pt", truncation=False).input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        return 0.0
    # targets: the next token at each position; the last position has none (-100 = not scored)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100, dtype=ids.dtype)], dim=1)
    return nll(model, ids, targets, batch_size=1) / math.log(2)


class BpbRouter:
    """Lowest bits on the prompt wins; confidence = softmax(-bits x ln 2) over the specialists."""

    kind = "bpb"

    def __init__(self, models: dict[str, tuple]):
        """models: domain -> (model, tokenizer, context)."""
        self.models = models
        self.domains = list(models)
        self.fit_s = 0.0

    def scores(self, prompt: str) -> dict[str, float]:
        # Only the bytes every model saw are compared: truncate the prompt to what the smallest context
        # holds (roughly 3 bytes per token for these byte-level BPEs) so that totals are comparable.
        cut = prompt[: 3 * min(ctx for _, _, ctx in self.models.values())]
        bits = {d: text_bits(m, t, cut, ctx) for d, (m, t, ctx) in self.models.items()}
        lo = min(bits.values())
        w = {d: math.exp(-(b - lo) * math.log(2)) for d, b in bits.items()}
        z = sum(w.values())
        return {d: v / z for d, v in w.items()}


def make_router(kind: str, train: dict[str, list[str]] | None = None, models: dict[str, tuple] | None = None):
    if kind == "tfidf":
        return TfidfRouter().fit(train or {})
    if kind == "bpb":
        return BpbRouter(models or {})
    raise UserError(f"router.kind: {kind!r} is not one of {', '.join(KINDS)}")


def routing_accuracy(router, test: dict[str, list[str]], cut: int = PROMPT_CUT) -> dict:
    """Routing accuracy on held-out documents per domain, on the full text and on its first `cut` characters,
    with the mean latency per prompt (ms)."""
    out: dict = {"kind": router.kind, "domains": {}, "n": 0}
    hits = {"full": 0, "cut": 0}
    total, t_sum = 0, 0.0
    for domain, texts in test.items():
        row = {"n": len(texts), "full": 0.0, f"first_{cut}": 0.0}
        for text in texts:
            for name, prompt in (("full", text), (f"first_{cut}", text[:cut])):
                t0 = time.perf_counter()
                s = router.scores(prompt)
                t_sum += time.perf_counter() - t0
                ok = max(s, key=s.get) == domain
                row[name] += ok
                hits["full" if name == "full" else "cut"] += ok
        total += len(texts)
        if texts:
            row["full"] /= len(texts)
            row[f"first_{cut}"] /= len(texts)
        out["domains"][domain] = row
    out["n"] = total
    out["accuracy"] = hits["full"] / total if total else None
    out[f"accuracy_first_{cut}"] = hits["cut"] / total if total else None
    out["ms_per_prompt"] = 1000 * t_sum / (2 * total) if total else None
    out["fit_s"] = round(router.fit_s, 3)
    return out
