"""bench: domain benchmarks built from the **test split only**, as lm-evaluation-harness task folders.

Four sets, made by the extractive teacher (`extractive.py`) from test-split chunks:
- `mcq`: cloze questions with 4 options (same-shape, length-matched distractors), multiple_choice,
  scored by acc / acc_norm;
- `completion`: a sentence's first part with 4 possible endings, multiple_choice, acc / acc_norm;
- `qa`: open-book short answer (a passage, one of its sentences with a technical term blanked, no
  options), generate_until, exact match and token F1;
- `summarization`: a section and its lead sentences as the reference, generate_until, ROUGE-L.
Items sharing any 13-gram with a training set (the curated train split, the synth data) are dropped
and counted. Each set is checked against trivial rules (always the longest option, the option
sharing most words with the question) next to chance; a rule far above chance is flagged.
Output: `tasks/` (one YAML + JSONL per set, plus `utils.py` with the metrics), so that
`lm_eval --include_path <run>/tasks --tasks slmforge_mcq,...` runs them unchanged on any model.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import RecipePath, StageConfig
from slmforge.console import console, info
from slmforge.errors import UserError
from slmforge.extractive import Chunk, ExtractiveTeacher, Pool, terms_in, trivial_baselines
from slmforge.records import read_documents
from slmforge.stages import synth
from slmforge.stages.synth import ngrams, split_chunks

NAME = "bench"
INPUTS = ("curate", "synth")
SETS = ("mcq", "completion", "qa", "summarization")
CHOICE_SETS = ("mcq", "completion")
# The accuracy each choice set is judged by. mcq options are single terms of one shape, so their
# prior probabilities are alike and plain accuracy works. completion options are spans whose prior
# probability varies far more than the context changes it for a small model ("surface form
# competition", Holtzman et al. 2021): on the demo both models score chance on plain acc, so the
# headline is acc_mutual_info, log P(ending | context) - log P(ending). All three are reported.
HEADLINE = {"mcq": "acc", "completion": "acc_mutual_info"}
QA_INSTRUCTION = "Fill in the blank with a term from the text above."
SET_FIELDS = {"mcq": ("question", "options", "answer_index"), "completion": ("question", "options", "answer_index"),
              "qa": ("question", "answer")}


class Config(StageConfig):
    """How many items per set, who writes them, and the decontamination n-gram."""

    teacher: Literal["extractive", "openai", "hf"] = Field(
        "extractive", description="who writes the items (model teachers use the synth stage's prompts and filters)")
    openai: dict | None = Field(None, description="teacher: openai: base_urls, model, api_key_env, concurrency, ...")
    hf_model: RecipePath | None = Field(None, description="teacher: hf: a local HF model folder")

    mcq: int = Field(200, ge=0, description="multiple-choice items")
    completion: int = Field(200, ge=0, description="sentence-completion items")
    qa: int = Field(200, ge=0, description="short-answer items")
    summarization: int = Field(50, ge=0, description="summarisation items")
    decontam_ngram: int = Field(13, ge=5, description="n-gram size shared with training data that drops an item")
    chunk_chars: int = Field(1500, ge=200)
    summary_tokens: int = Field(96, ge=8, description="tokens a model may generate for a summary (below its context)")
    prefix: str = Field("slmforge", pattern=r"^[a-z][a-z0-9_]*$", description="task names: <prefix>_<set>")
    dev: int = Field(100, ge=0, description="items per choice set from the val split, to pick checkpoints on")
    seed: int = 0

    @model_validator(mode="after")
    def _teacher(self):
        self.synth_config()  # the synth stage's checks of teacher, openai and hf_model
        return self

    def synth_config(self) -> synth.Config:
        return synth.Config(teacher=self.teacher, openai=self.openai, hf_model=self.hf_model,
                            kinds=["mcq", "completion", "qa", "summary"], decontam_ngram=self.decontam_ngram,
                            chunk_chars=self.chunk_chars, seed=self.seed)


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"curate": store.resolve("curate:latest"), "synth": store.resolve("synth:latest")}
    cache = store.workdir / "teacher-cache"
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out, cache), force=force)


def _from_model_teacher(cfg: Config, chunks: list[Chunk], wanted: dict[str, int], cache: Path) -> dict:
    """{(chunk id, set): item} written by a model teacher, for the chunks make_sets will visit first;
    items that fail the synth stage's schema, length and groundedness filters are left out."""
    scfg = cfg.synth_config()
    teacher = synth.model_teacher(scfg, cache)
    need = min(len(chunks), max(wanted.values(), default=0) * 3 // 2 + 5)
    state = {"exact": set(), "near": defaultdict(lambda: synth.NearDup(scfg.near_dup_jaccard, cfg.seed)),
             "heldout": set()}  # bench decontaminates against the training data itself, below
    info(f"  bench · asking the {cfg.teacher} teacher about {need} test chunks")
    by_id = {c.id: c for c in chunks}
    found = {}
    for row in synth.generate_items(scfg, teacher, _ordered(chunks, cfg.seed)[:need], [], state):
        if not row["kept"]:
            continue
        if row["kind"] == "summary":
            found[(row["chunk_id"], "summarization")] = {"document": by_id[row["chunk_id"]].text.strip(),
                                                          "summary": row["answer"]}
        else:
            found[(row["chunk_id"], row["kind"])] = {k: row[k] for k in ("question", "options", "answer_index",
                                                                         "answer") if k in SET_FIELDS[row["kind"]]}
            if row["kind"] == "qa":  # open book, like the extractive set: the section is the passage
                found[(row["chunk_id"], "qa")]["passage"] = " ".join(by_id[row["chunk_id"]].text.split())[:1200]
    return found


def _ordered(chunks: list[Chunk], seed: int) -> list[Chunk]:
    order = chunks[:]
    random.Random(seed).shuffle(order)
    return order


def _qa_item(teacher: ExtractiveTeacher, chunk: Chunk, rng: random.Random) -> dict | None:
    """Open-book short answer (SQuAD-style): a passage of the section, and one of its sentences with a
    technical term blanked; the answer is that term. Closed-book recall of a term from an unseen page
    is beyond a model of a few million parameters (both demo models scored exact match 0.000)."""
    sents = chunk.sentences()
    cands = [(i, t) for i, s in enumerate(sents) for t in terms_in(s) if s.count(t) == 1]
    if not cands:
        return None
    i, t = rng.choice(cands)
    return {"passage": " ".join(sents[max(0, i - 1): i + 2]), "question": sents[i].replace(t, "_____", 1),
            "answer": t}


def make_sets(chunks: list[Chunk], wanted: dict[str, int], train_grams: set[int], cfg: Config,
              written: dict | None = None) -> tuple[dict, Counter]:
    """Items per set from the chunks (by the extractive teacher, or looked up in `written`, a model
    teacher's items), and how many were dropped for sharing an n-gram with training."""
    teacher = ExtractiveTeacher(Pool.build(chunks), cfg.seed)
    order = _ordered(chunks, cfg.seed)
    sets: dict[str, list[dict]] = {k: [] for k in wanted}
    dropped: Counter = Counter()
    seen: set[tuple] = set()
    for name in wanted:
        for c in order:
            if len(sets[name]) >= wanted[name]:
                break
            r = random.Random(f"{cfg.seed}:{c.id}:{name}")
            if written is not None:
                item = written.get((c.id, name))
            elif name in ("mcq", "completion"):
                made = teacher.items(c, name, 1)
                item = made[0] if made else None
                if item:
                    item = {"question": item["question"], "options": item["options"],
                            "answer_index": item["answer_index"]}
            elif name == "qa":
                item = _qa_item(teacher, c, r)
            else:
                made = teacher.items(c, "summary", 1)
                item = {"document": c.text.strip(), "summary": made[0]["answer"]} if made else None
            if not item:
                continue
            text = " ".join(str(v) for v in item.values() if isinstance(v, str))
            key = (name, text)
            if key in seen:
                continue
            seen.add(key)
            if ngrams(text, cfg.decontam_ngram) & train_grams:
                dropped[name] += 1
                continue
            item["id"] = f"{name}-{len(sets[name]):05d}"
            item["chunk_id"] = c.id
            sets[name].append(item)
    return sets, dropped


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, cache: Path) -> dict:
    curate, synth_art = inputs["curate"], inputs["synth"]
    roles = curate.manifest["metrics"]["roles"]
    domain = [s for s, r in roles.items() if r == "domain"]
    chunks = split_chunks(curate, "test", domain, cfg.chunk_chars)
    if not chunks:
        raise UserError("bench: the domain test split is empty; raise curate.test_fraction")
    info(f"  bench · {len(chunks)} test chunks; indexing training text for decontamination")
    train_grams: set[int] = set()
    for row in read_documents(curate.path / "data" / "train", columns=["text"]):
        train_grams |= ngrams(row["text"], cfg.decontam_ngram)
    for line in (synth_art.path / "items.jsonl").read_text(encoding="utf-8").splitlines():
        it = json.loads(line)
        train_grams |= ngrams(" ".join(m["content"] for m in it.get("messages", [])), cfg.decontam_ngram)

    wanted = {"mcq": cfg.mcq, "completion": cfg.completion, "qa": cfg.qa, "summarization": cfg.summarization}
    written = _from_model_teacher(cfg, chunks, wanted, cache) if cfg.teacher != "extractive" else None
    sets, dropped = make_sets(chunks, wanted, train_grams, cfg, written)
    # dev sets from the val split, never the test split: evaluate.select picks checkpoints on them
    dev: dict[str, list] = {}
    dev_chunks = split_chunks(curate, "val", domain, cfg.chunk_chars) if cfg.dev else []
    if dev_chunks:
        dev_wanted = {k: cfg.dev for k in CHOICE_SETS}
        dev_written = _from_model_teacher(cfg, dev_chunks, dev_wanted, cache) if written is not None else None
        dev, _ = make_sets(dev_chunks, dev_wanted, train_grams, cfg, dev_written)

    final = out.with_name(out.name.removesuffix(".partial"))  # where the task YAMLs will point
    tasks = out / "tasks"
    tasks.mkdir()
    for name, items in [*sets.items(), *((f"{k}_dev", v) for k, v in dev.items() if v)]:
        with open(tasks / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
        (tasks / f"{cfg.prefix}_{name}.yaml").write_text(
            task_yaml(f"{cfg.prefix}_{name}", name.removesuffix("_dev"), final / "tasks" / f"{name}.jsonl",
                      cfg.summary_tokens), encoding="utf-8")
    (tasks / "utils.py").write_text(UTILS, encoding="utf-8")
    baselines = {k: trivial_baselines(sets[k]) for k in CHOICE_SETS}
    flags = [f"{k}: {rule} {v:.0%} vs chance 25%" for k, b in baselines.items() for rule, v in b.items()
             if rule not in ("chance", "items") and v > 0.40]
    metrics = {"sizes": {k: len(v) for k, v in sets.items()}, "asked": wanted, "decontaminated": dict(dropped),
               "trivial_baselines": baselines, "flags": flags, "test_chunks": len(chunks),
               "tasks": [f"{cfg.prefix}_{k}" for k in SETS if sets[k]],
               "dev_tasks": {k: f"{cfg.prefix}_{k}_dev" for k, v in dev.items() if v},
               "dev_sizes": {k: len(v) for k, v in dev.items()},
               "headline": {k: v for k, v in HEADLINE.items() if sets[k]},
               "built_with": (f"{cfg.teacher} teacher from the domain test split" +
                              ("; distractors from other test chunks" if written is None else
                               "; the synth stage's prompts and filters") +
                              "; dev sets (checkpoint selection) the same way from the val split")}
    _print(metrics)
    return metrics


def task_yaml(task: str, kind: str, data: Path, summary_tokens: int = 96) -> str:
    head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n" \
           "test_split: test\n"
    if kind in ("mcq", "completion"):
        text = "{{question}}\\nAnswer:" if kind == "mcq" else "{{question}}"
        return head + (f'output_type: multiple_choice\ndoc_to_text: "{text}"\ndoc_to_choice: "{{{{options}}}}"\n'
                       "doc_to_target: answer_index\ntarget_delimiter: \" \"\nmetric_list:\n"
                       "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: acc_mutual_info\n    aggregation: mean\n    higher_is_better: true\n")
    if kind == "qa":
        return head + ('output_type: generate_until\ndoc_to_text: "{{passage}}\\n\\n' + QA_INSTRUCTION +
                       '\\n{{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
                       '  until: ["\\n", "."]\n'
                       "  max_gen_toks: 16\n  do_sample: false\nprocess_results: !function utils.process_qa\n"
                       "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: f1\n    aggregation: mean\n    higher_is_better: true\n")
    return head + ('output_type: generate_until\ndoc_to_text: "{{document}}\\n\\nSummary:"\n'
                   'doc_to_target: "{{summary}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
                   f"  max_gen_toks: {summary_tokens}\n"
                   "  do_sample: false\nprocess_results: !function utils.process_summary\n"
                   "metric_list:\n  - metric: rougeL\n    aggregation: mean\n    higher_is_better: true\n")


UTILS = '''"""Metrics for slmforge's generate_until tasks (written by the bench stage).

Plain Python on purpose: the task folder must run wherever lm-eval runs, with no extra package."""
import re
from collections import Counter


def _tokens(text):
    return re.findall(r"\\w+", text.lower())


def _f1(pred, ref):
    p, r = _tokens(pred), _tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def process_qa(doc, results):
    pred = results[0].strip()
    return {"exact_match": float(" ".join(_tokens(pred)) == " ".join(_tokens(doc["answer"]))),
            "f1": _f1(pred, doc["answer"])}


def process_summary(doc, results):
    p, r = _tokens(results[0]), _tokens(doc["summary"])
    lcs = _lcs(p, r)
    if not p or not r or not lcs:
        return {"rougeL": 0.0}
    precision, recall = lcs / len(p), lcs / len(r)
    return {"rougeL": 2 * precision * recall / (precision + recall)}
'''


def _print(m: dict) -> None:
    from rich.table import Table

    t = Table(title="bench: items per set")
    for col in ("set", "items", "dropped (train overlap)", "longest option", "shortest option", "most overlap",
                "chance"):
        t.add_column(col)
    for k in SETS:
        b = m["trivial_baselines"].get(k, {})
        t.add_row(k, str(m["sizes"][k]), str(m["decontaminated"].get(k, 0)),
                  *[f"{b[r]:.0%}" if b else "" for r in ("longest_option", "shortest_option", "most_overlap")],
                  "25%" if b else "")
    console.print(t)
    for f in m["flags"]:
        console.print(f"[yellow]warning[/]: a trivial rule beats chance: {f}")
