"""bench: domain benchmarks built from the **test split only**, as lm-evaluation-harness task folders.

Four sets from test-split chunks, made by the extractive teacher (`extractive.py`), or for the sets in
`teacher_sets` by a model teacher (`teacher: hf` or `openai`):
- `mcq`: cloze questions with 4 options (same-shape, length-matched distractors), multiple_choice,
  scored by acc / acc_norm;
- `completion`: a sentence's first part with 4 possible endings, multiple_choice, acc / acc_norm;
- `qa`: open-book short answer, generate_until, exact match, token F1 and ROUGE-L. Extractive: a passage
  and one of its sentences with a technical term blanked. A model teacher: a question a person would
  ask, written by the teacher for one of the chunk's sentences (the reference answer), from bench's own
  prompt (`templates/bench/qa.j2`, never synth's), with the sentences around it as the passage;
- `summarization`: a section and its lead sentences as the reference, generate_until, ROUGE-L.
The manifest says, per set, which generator wrote it and whether the training data (the synth stage)
came from the same one; no training prompt has a bench prompt's shape (sft, tests/stages/test_sft.py).
Items sharing any 13-gram with a training set (the curated train split, the synth data) are dropped
and counted. Each set is checked against trivial rules (always the longest option, the option
sharing most words with the question) next to chance; a rule far above chance is flagged.
Output: `tasks/` (one YAML + JSONL per set, plus `utils.py` with the metrics), so that
`lm_eval --include_path <run>/tasks --tasks slmforge_mcq,...` runs them unchanged on any model.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.common import write_jsonl
from slmforge.console import console, info
from slmforge.errors import UserError
from slmforge.evaluation.prompts import HEADLINE, UTILS, render, task_yaml
from slmforge.records import Curated, Synthesized
from slmforge.synthetic.extractive import (
    Chunk,
    ExtractiveTeacher,
    Pool,
    content_words,
    definitions,
    terms_in,
    trivial_baselines,
)
from slmforge.synthetic.synthesis import (
    Filters,
    FilterState,
    TeacherConfig,
    generate_items,
    ngrams,
    render_prompt,
    split_chunks,
    teacher_label,
)

NAME = "bench"
INPUTS = ("curate", "synth")
SETS = ("mcq", "completion", "qa", "summarization")
CHOICE_SETS = ("mcq", "completion")
SET_FIELDS = {"mcq": ("question", "options", "answer_index"), "completion": ("question", "options", "answer_index"),
              "qa": ("question", "answer")}


class Config(TeacherConfig):
    """How many items per set, who writes them (model teachers use the synth stage's prompts and filters),
    and the decontamination n-gram."""

    mcq: int = Field(200, ge=0, description="multiple-choice items")
    completion: int = Field(200, ge=0, description="sentence-completion items")
    qa: int = Field(200, ge=0, description="short-answer items")
    summarization: int = Field(50, ge=0, description="summarisation items")
    decontam_ngram: int = Field(13, ge=5, description="n-gram size shared with training data that drops an item")
    chunk_chars: int = Field(1500, ge=200)
    summary_tokens: int = Field(96, ge=8, description="tokens a model may generate for a summary (below its context)")
    context: int | None = Field(
        None, ge=32, description="the shortest context (tokens) of the models evaluate scores: a summarization "
        "document is cut after its last whole sentence that leaves room for the prompt and summary_tokens (counted "
        "with the run's tokenizers), else lm-eval cuts its start, the lead the reference is made of; None: whole")
    prefix: str = Field("slmforge", pattern=r"^[a-z][a-z0-9_]*$", description="task names: <prefix>_<set>")
    dev: int = Field(100, ge=0, description="items per choice set from the val split, to pick checkpoints on")
    teacher_sets: list[Literal["mcq", "completion", "qa", "summarization"]] = Field(
        list(SETS), description="with a model teacher: the sets it writes (the others stay extractive)")

    def key_dict(self) -> dict:
        d = super().key_dict()
        if d["context"] is None:  # off: the key of a run from before the setting existed
            del d["context"]
        return d

    def generator(self, name: str) -> str:
        """Who writes set `name`: `extractive`, or the model teacher by name (hf:<model>, openai:<model>)."""
        if self.teacher == "extractive" or name.removesuffix("_dev") not in self.teacher_sets:
            return "extractive"
        return teacher_label(self.model_dump(mode="json"))


def external(cfg: Config) -> dict:
    """The teacher's identity (hf_model: a base or a folder), so that replacing or editing it re-runs this
    stage."""
    return cfg.external()


def needs(cfg: Config) -> tuple[str, ...]:
    """The tokenizers count a summarization document's tokens when `context` is set."""
    return INPUTS + (("tokenizer",) if cfg.context else ())


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in needs(cfg)}
    cache = store.workdir / "teacher-cache"
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out, cache), force=force,
                       external=external(cfg))


def _from_model_teacher(cfg: Config, chunks: list[Chunk], wanted: dict[str, int], cache: Path,
                        stats: dict | None = None) -> dict:
    """{(chunk id, set): item} written by a model teacher for its sets (`teacher_sets`), for the chunks
    make_sets will visit first. mcq, completion and summaries come through the synth stage's prompts, with
    its schema, length and groundedness filters; qa through `questions`."""
    sets = [s for s in cfg.teacher_sets if wanted.get(s)]
    if not sets:
        return {}
    teacher = cfg.model_teacher(cache)
    need = min(len(chunks), max(wanted[s] for s in sets) * 2 + 5)
    order = _ordered(chunks, cfg.seed)[:need]
    info(f"  bench · asking the {cfg.generator(sets[0])} teacher for {', '.join(sets)} about {need} chunks")
    found = {}
    if "qa" in sets:
        found.update(questions(teacher, order, cfg.seed, stats))
    kinds = [{"summarization": "summary"}.get(s, s) for s in sets if s != "qa"]
    # the synth stage's default filters; bench decontaminates against the training data itself, below
    state = FilterState(Filters(decontam_ngram=cfg.decontam_ngram, seed=cfg.seed))
    by_id = {c.id: c for c in chunks}
    for row in generate_items(teacher, order, kinds, 1, [], {}, state) if kinds else []:
        if not row["kept"]:
            continue
        if row["kind"] == "summary":
            found[(row["chunk_id"], "summarization")] = {"document": by_id[row["chunk_id"]].text.strip(),
                                                          "summary": row["answer"]}
        else:
            found[(row["chunk_id"], row["kind"])] = {k: row[k] for k in SET_FIELDS[row["kind"]]}
    return found


def questions(teacher, chunks: list[Chunk], seed: int, stats: dict | None = None) -> dict:
    """Open-book qa items a person would ask: per chunk one of its sentences is the reference answer
    (grounded by construction), the teacher writes the question it answers (bench's own prompt,
    `templates/bench/qa.j2`, greedy), and the sentences around it are the passage. Answer-aware question
    generation asks little of the teacher: asking SmolLM2-135M for a question and an answer as JSON gave
    almost no usable items at commit ef79d62; this way most sentences get a kept question (bench's
    manifest: `teacher_qa` asked and kept), and the README's hand check says how many are sensible."""
    from slmforge.synthetic.teacher import Request

    template = {"qa": str(files("slmforge").joinpath("templates/bench/qa.j2"))}
    picked = []
    for c in chunks:
        # a definition ("X is ...", "X provides ...") when the chunk has one, else a sentence that stands
        # on its own: on the demo, sentences that lean on the one before ("This ...", "Note that ...") or
        # point elsewhere ("See ...") got questions their sentence does not answer
        sents = [s for _, s in definitions(c) if 8 <= len(s.split()) <= 40] or \
            [s for s in c.sentences() if 8 <= len(s.split()) <= 40 and not _LEANS.match(s)]
        if sents:
            s = random.Random(f"{seed}:{c.id}:qa").choice(sents)
            prompt, _ = render_prompt("qa", Chunk(c.id, c.doc_id, c.source, c.title, s), [], template)
            picked.append((c, s, Request(key=f"{c.id}:bench-qa", messages=[{"role": "user", "content": prompt}],
                                         max_tokens=40, temperature=0.0)))
    dropped: Counter = Counter()
    found = {}
    t0 = time.time()
    for (c, s, _), reply in zip(picked, teacher.generate([r for _, _, r in picked])):
        q, problem = _question(reply.text or "", s)
        if problem:
            dropped[problem] += 1
            continue
        found[(c.id, "qa")] = {"passage": passage_for(c, s), "question": q, "answer": s}
    if stats is not None:
        stats.update(asked=len(picked), kept=len(found), dropped=dict(dropped), wall_s=round(time.time() - t0, 1),
                     teacher_tokens={k: teacher.stats.get(k, 0) for k in ("prompt_tokens", "completion_tokens")})
    return found


_LEANS = re.compile(r"(This|These|That|Those|It|Its|They|Their|Such|Also|However|Thus|Therefore|Otherwise|"
                    r"Note|See|For more|For example|In this|In that|Here|Then|Even so)\b")


def _question(text: str, sentence: str) -> tuple[str, str | None]:
    """The reply's first line as a question, or why it is not one."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if ': "' in line:  # 'A user would ask: "What ...?"', 'The question to which this sentence answers is: "...'
        line = line.rsplit(': "', 1)[1]
    line = line.removeprefix("Question:").strip().strip('"').strip()
    words = line.split()
    if not line.endswith("?"):
        return line, "not a question"
    if not 4 <= len(words) <= 40:
        return line, "length"
    if " ".join(sentence.lower().split()) in line.lower() or "the answer to" in line.lower():
        return line, "gives the answer away or asks about the question"
    if "this sentence" in line.lower():
        return line, "refers to the sentence"
    if not set(content_words(line)) & set(content_words(sentence)):
        return line, "off topic (no word of the sentence)"
    return line, None


def passage_for(chunk: Chunk, answer: str, width: int = 3) -> str:
    """The `width` consecutive sentences of the chunk that hold the answer (when it is one of them) and
    share most content words with it: a passage that fits a small model's context."""
    sents = chunk.sentences() or [" ".join(chunk.text.split())]
    want = set(content_words(answer))
    best = max(range(max(1, len(sents) - width + 1)),
               key=lambda i: (answer in sents[i:i + width], len(want & set(content_words(" ".join(sents[i:i + width])))),
                              -i))
    return " ".join(sents[best:best + width])


def _ordered(chunks: list[Chunk], seed: int) -> list[Chunk]:
    order = chunks[:]
    random.Random(seed).shuffle(order)
    return order


def _qa_item(teacher: ExtractiveTeacher, chunk: Chunk, rng: random.Random) -> dict | None:
    """Open-book short answer (SQuAD-style): a passage of the section, and one of its sentences with a
    technical term blanked; the answer is that term. Closed-book recall of a term from an unseen page
    is beyond a model of a few million parameters (both demo models scored exact match 0 closed-book, at
    commit d59ac30)."""
    sents = chunk.sentences()
    cands = [(i, t) for i, s in enumerate(sents) for t in terms_in(s) if s.count(t) == 1]
    if not cands:
        return None
    i, t = rng.choice(cands)
    return {"passage": " ".join(sents[max(0, i - 1): i + 2]), "question": sents[i].replace(t, "_____", 1),
            "answer": t}


def make_sets(chunks: list[Chunk], wanted: dict[str, int], train_grams: set[int], cfg: Config,
              written: dict | None = None, fit=None) -> tuple[dict, Counter]:
    """Items per set from the chunks (by the extractive teacher, or looked up in `written`, a model
    teacher's items), and how many were dropped for sharing an n-gram with training (or, with `fit`,
    a summarization document that cannot be made to fit the context)."""
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
            if written is not None and cfg.generator(name) != "extractive":
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
            if item and name == "summarization" and fit is not None:
                item = fit(item, cut=cfg.generator(name) == "extractive")
                if item is None:
                    continue
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


_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n+")


def summary_fitter(cfg: Config, tokenizer: Artifact):
    """fit(item, cut) -> the item whose prompt leaves `summary_tokens` (and BOS) of `context`, counted with
    the longer of the run's tokenizers (domain and general BPE); if the document is too long and `cut`
    (an extractive lead summary), it ends after its last whole sentence that fits, as long as it still holds
    the reference and is twice its length (the teacher's own rule); else None. lm-eval would otherwise
    keep the prompt's last tokens, and lose the lead sentences the reference is."""
    from tokenizers import Tokenizer

    toks = [Tokenizer.from_file(str(p)) for d in ("tokenizer", "general_tokenizer")
            if (p := tokenizer.path / d / "tokenizer.json").is_file()]
    budget = cfg.context - cfg.summary_tokens - 1

    def count(document: str) -> int:
        text = render("summarization", document=document)
        return max(len(t.encode(text, add_special_tokens=False).ids) for t in toks)

    def fit(item: dict, cut: bool) -> dict | None:
        doc = item["document"]
        if count(doc) <= budget:
            fit.stats["whole"] += 1
            return item
        fit.stats["too_long"] += 1
        if not cut:
            return None
        ends = [m.start() for m in _SENTENCE_END.finditer(doc)]
        lo, hi, best = 0, len(ends) - 1, None  # the longest prefix that fits: count grows with the prefix
        while lo <= hi:
            mid = (lo + hi) // 2
            if count(doc[: ends[mid]]) <= budget:
                best, lo = ends[mid], mid + 1
            else:
                hi = mid - 1
        if best is None:
            return None
        kept, ref = " ".join(doc[:best].split()), " ".join(item["summary"].split())
        if ref not in kept or len(kept) < 2 * len(ref):
            return None
        fit.stats["cut"] += 1
        return {**item, "document": doc[:best].rstrip()}

    fit.stats = Counter()
    return fit


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path, cache: Path) -> dict:
    curated, synth = Curated.of(inputs["curate"]), Synthesized.of(inputs["synth"])
    chunks = split_chunks(curated, "test", curated.domain, cfg.chunk_chars)
    if not chunks:
        raise UserError("bench: the domain test split is empty; raise curate.test_fraction")
    info(f"  bench · {len(chunks)} test chunks; indexing training text for decontamination")
    train_grams: set[int] = set()
    for row in curated.documents("train", columns=["text"]):
        train_grams |= ngrams(row["text"], cfg.decontam_ngram)
    for it in synth.items:
        train_grams |= ngrams(" ".join(m["content"] for m in it.get("messages", [])), cfg.decontam_ngram)

    wanted = {"mcq": cfg.mcq, "completion": cfg.completion, "qa": cfg.qa, "summarization": cfg.summarization}
    qa_stats: dict = {}
    written = _from_model_teacher(cfg, chunks, wanted, cache, qa_stats) if cfg.teacher != "extractive" else None
    fit = summary_fitter(cfg, inputs["tokenizer"]) if cfg.context else None
    sets, dropped = make_sets(chunks, wanted, train_grams, cfg, written, fit)
    # dev sets from the val split, never the test split: evaluate.select picks checkpoints on them
    dev: dict[str, list] = {}
    dev_chunks = split_chunks(curated, "val", curated.domain, cfg.chunk_chars) if cfg.dev else []
    if dev_chunks:
        dev_wanted = {k: cfg.dev for k in CHOICE_SETS}
        dev_written = _from_model_teacher(cfg, dev_chunks, dev_wanted, cache) if written is not None else None
        dev, _ = make_sets(dev_chunks, dev_wanted, train_grams, cfg, dev_written)

    final = out.with_name(out.name.removesuffix(".partial"))  # where the task YAMLs will point
    tasks = out / "tasks"
    tasks.mkdir()
    for name, items in [*sets.items(), *((f"{k}_dev", v) for k, v in dev.items() if v)]:
        write_jsonl(tasks / f"{name}.jsonl", items)
        kind = name.removesuffix("_dev")
        kind = "qa_open" if kind == "qa" and cfg.generator(kind) != "extractive" else kind
        (tasks / f"{cfg.prefix}_{name}.yaml").write_text(
            task_yaml(f"{cfg.prefix}_{name}", kind, final / "tasks" / f"{name}.jsonl", cfg.summary_tokens),
            encoding="utf-8")
    (tasks / "utils.py").write_text(UTILS, encoding="utf-8")
    baselines = {k: trivial_baselines(sets[k]) for k in CHOICE_SETS}
    flags = [f"{k}: {rule} {v:.0%} vs chance 25%" for k, b in baselines.items() for rule, v in b.items()
             if rule not in ("chance", "items") and v > 0.40]
    metrics = {"sizes": {k: len(v) for k, v in sets.items()}, "asked": wanted, "decontaminated": dict(dropped),
               **({"summarization_fit": {"context": cfg.context, **fit.stats}} if fit else {}),
               "trivial_baselines": baselines, "flags": flags, "test_chunks": len(chunks),
               "tasks": [f"{cfg.prefix}_{k}" for k in SETS if sets[k]],
               "dev_tasks": {k: f"{cfg.prefix}_{k}_dev" for k, v in dev.items() if v},
               "dev_sizes": {k: len(v) for k, v in dev.items()},
               "headline": {k: v for k, v in HEADLINE.items() if sets[k]},
               "built_with": (f"{cfg.teacher} teacher from the domain test split" +
                              ("; distractors from other test chunks" if written is None else
                               f" for {', '.join(cfg.teacher_sets)} (qa: bench's own prompt; the others: the "
                               "synth stage's prompts), with synth's filters") +
                              "; dev sets (checkpoint selection) the same way from the val split"),
               "independence": independence(cfg, inputs["synth"], [k for k in SETS if sets[k]]),
               **({"teacher_qa": qa_stats} if qa_stats else {})}
    _print(metrics)
    return metrics


def independence(cfg: Config, synth_art: Artifact, names: list[str]) -> dict:
    """Per set: its generator, the training data's (synth's teacher), and whether they are the same model.
    Prompt shapes are never shared: sft trains no bench template (tests/stages/test_sft.py)."""
    trained = teacher_label(synth_art.manifest.get("config", {}))
    return {k: {"generator": cfg.generator(k), "training_data": trained,
                "same_generator": cfg.generator(k) == trained, "same_prompt_shape": False} for k in names}


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
    if f := m.get("summarization_fit"):
        console.print(f"  bench · summarization documents for a {f['context']}-token context: {f.get('whole', 0)} fit "
                      f"whole, {f.get('cut', 0)} cut after a sentence, {f.get('too_long', 0) - f.get('cut', 0)} "
                      "left out (the cut would lose the reference)")
    for f in m["flags"]:
        console.print(f"[yellow]warning[/]: a trivial rule beats chance: {f}")
    for k, v in m["independence"].items():
        console.print(f"  bench · {k}: written by {v['generator']}; training data by {v['training_data']}"
                      + (" (the same generator: a gain may be the generator's style)" if v["same_generator"] else ""))
