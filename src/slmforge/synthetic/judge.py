"""A judge model for the qa benchmark: any OpenAI-compatible server (vLLM, llama.cpp, Ollama, OpenAI)
reads a question, its reference answer and a model's answer, and says whether the answer is correct.

Token F1 and ROUGE-L reward copying the reference's words; a judge can accept a correct answer in other
words, and reject a wordy one that shares them. Neither is ground truth, so the report shows the
judge's verdicts next to F1 >= 0.5 on the same items: their agreement and Cohen's kappa. The requests go
through the synth teacher's client (teacher.OpenAITeacher: concurrency, retries, cache), at
temperature 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmforge.console import info

if TYPE_CHECKING:
    from slmforge.records import Benchmarks

VERDICT_PROMPT = """You grade answers to questions about software documentation.

Question: {question}
Reference answer: {reference}
Answer to grade: {answer}

Is the answer to grade correct: does it say what the reference answer says (other words are fine; \
missing the point, contradicting it or saying nothing is not)? Reply with JSON only: {{"verdict": "yes"}} \
or {{"verdict": "no"}}."""
SCHEMA = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["verdict"], "additionalProperties": False}
F1_CORRECT = 0.5  # the F1 at which an answer counts as correct when the judge is compared with F1


class JudgeConfig(BaseModel):
    """evaluate.judge: the server, its model, and how many qa answers per model it grades."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(description="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    model: str = Field(min_length=1, description="the judge model's name on that server")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    sample: int = Field(100, ge=1, description="qa answers graded per model (the first by item id)")
    concurrency: int = Field(8, ge=1, description="requests in flight")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} must start with http:// or https://, e.g. http://localhost:8000/v1")
        return v.rstrip("/")


def judge(cfg: JudgeConfig, rows: list[dict], cache: Path) -> list[bool | None]:
    """A verdict per row ({question, reference, answer}): True correct, False not, None no usable reply."""
    from slmforge.synthetic.teacher import OpenAIConfig, OpenAITeacher, Request

    teacher = OpenAITeacher(OpenAIConfig(base_urls=[cfg.base_url], model=cfg.model, api_key_env=cfg.api_key_env,
                                         concurrency=cfg.concurrency), cache)
    reqs = [Request(key=f"judge:{i}", messages=[{"role": "user", "content": VERDICT_PROMPT.format(**r)}],
                    json_schema=SCHEMA, max_tokens=16, temperature=0.0) for i, r in enumerate(rows)]
    out: list[bool | None] = []
    for reply in teacher.generate(reqs):
        verdict = reply.data.get("verdict") if isinstance(reply.data, dict) else None
        out.append({"yes": True, "no": False}.get(str(verdict).strip().lower()))
    return out


def agreement(verdicts: list[bool | None], f1s: list[float]) -> dict:
    """How the judge's verdicts and F1 >= F1_CORRECT agree on the items both graded."""
    pairs = [(v, f >= F1_CORRECT) for v, f in zip(verdicts, f1s) if v is not None]
    n = len(pairs)
    if not n:
        return {"items": 0, "unparsed": len(verdicts)}
    from sklearn.metrics import cohen_kappa_score

    agree = sum(a == b for a, b in pairs) / n
    pj, pf = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    judge, f1 = [a for a, _ in pairs], [b for _, b in pairs]
    # both graders giving one same verdict on every item: chance agreement is 1 and kappa undefined
    # (scikit-learn returns nan); they agree on everything, so 1
    kappa = 1.0 if len(set(judge) | set(f1)) == 1 else float(cohen_kappa_score(judge, f1))
    return {"items": n, "unparsed": len(verdicts) - n, "judge_correct": round(pj, 4), "f1_correct": round(pf, 4),
            "agreement": round(agree, 4), "kappa": round(kappa, 4)}


def grade_qa(cfg: JudgeConfig, bench: Benchmarks, benchmarks: dict, outcomes: dict, cache: Path) -> dict:
    """evaluate's judge: the verdicts on the first `cfg.sample` qa answers of every model (`outcomes`:
    {model: {task: lm-eval's per-item outcomes and responses}}): a `judge` score next to F1 in `benchmarks`
    ({model: {task: {metric: score}}}), and each model's agreement with F1 >= 0.5 on the same items."""
    task = bench.tasks["qa"]
    items = bench.items("qa")[: cfg.sample]  # lm-eval's doc ids are the JSONL's line order
    per_model, pooled = {}, ([], [])
    for name, per in outcomes.items():
        o = per.get(task)
        if not o or "responses" not in o:
            continue
        rows = [{"question": it["question"], "reference": it["answer"], "answer": a.strip()}
                for it, a in zip(items, o["responses"])]
        info(f"  evaluate · the judge ({cfg.model}) grades {len(rows)} qa answers of {name}")
        verdicts = judge(cfg, rows, cache)
        got = [v for v in verdicts if v is not None]
        benchmarks[name][task]["judge"] = round(sum(got) / len(got), 4) if got else None
        per_model[name] = agreement(verdicts, o["f1"][: len(rows)])
        pooled[0].extend(verdicts)
        pooled[1].extend(o["f1"][: len(rows)])
    return {"model": cfg.model, "base_url": cfg.base_url, "prompt": VERDICT_PROMPT,
            "f1_correct_at": F1_CORRECT, "per_model": per_model, "pooled": agreement(*pooled)}
