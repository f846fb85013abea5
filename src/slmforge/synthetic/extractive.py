"""The extractive teacher: synthetic items built from the text itself, with no model.

Deterministic (a seeded RNG per chunk), offline, and grounded by construction: every answer is a
span of the source chunk. It is the default teacher so the pipeline and its tests run anywhere.
- qa: "What is X?" from definitional sentences ("X is a ...", "X provides ..."), and a section's
  heading turned into a question, answered by the section's first sentences.
- mcq: a cloze of a sentence with one technical term blanked; the three distractors are terms of
  the same shape (identifier, keyword, number, word) drawn from the rest of the corpus.
- completion: the first part of a sentence; the true ending against endings of other sentences.
- summary: the section, summarised by its lead sentences.
- instruction: "Explain <heading>." answered by the section's opening paragraph.
- evidence: a question, its answer and the supporting sentences quoted (no reasoning: a teacher without
  a model cannot explain; model teachers write `rationale` items, their own reasoning, instead).
- preference: a question with the grounded answer (chosen) against an answer taken from another
  section (rejected).
- reading: the chunk followed by questions about it and their answers, mined from the text itself
  (a title, definitions, a term used in a sentence, a sentence to complete, statements the text does
  or does not support), the regex-mined reading-comprehension tasks of Cheng et al. 2024 ("Adapting
  Large Language Models via Reading Comprehension"): pretraining text that teaches to use the domain.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?")
_DEFINITION = re.compile(
    r"^(?P<article>The |An? )?(?P<term>[A-Za-z_][\w.\-]*(?: [A-Za-z_][\w\-]*){0,3}?) "
    r"(?P<verb>is|are|provides|returns|specifies|controls|determines|stores|contains|allows|defines) (?P<rest>.+)$")
_DEFINING = re.compile(r"(?:a|an|the|one|used|defined|stored|responsible|similar|equivalent|set|called)\b")
_NOT_A_TERM = frozenset("each every some any all both either neither there here also such its their our".split())
_HEADING_NUM = re.compile(r"^(?:[A-Z]?\d+(?:\.\d+)*\.?|[A-Z]\.\d+(?:\.\d+)*\.?)\s+")
STOPWORDS = frozenset(
    "a an the and or of to in on for with by as at from is are was were be been it its this that these those "
    "which who what when where how can may must will would should not no do does if then than so such".split())


@dataclass
class Chunk:
    id: str
    doc_id: str
    source: str
    title: str
    text: str

    def sentences(self) -> list[str]:
        return prose_sentences(self.text)


@dataclass
class Pool:
    """Corpus-wide material for distractors: terms by shape, and sentences, each with its chunk id."""

    terms: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sentences: list[tuple[str, str]] = field(default_factory=list)
    answers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def build(cls, chunks: list[Chunk]) -> Pool:
        pool = cls()
        seen: dict[str, set] = defaultdict(set)
        for c in chunks:
            for s in c.sentences():
                pool.sentences.append((c.id, s))
                for t in terms_in(s):
                    shape = term_shape(t)
                    if t not in seen[shape]:
                        seen[shape].add(t)
                        pool.terms[shape].append(t)
            lead = lead_answer(c)
            if lead:
                pool.answers.append((c.id, lead))
        return pool


def is_prose(line: str) -> bool:
    """A line of running text: not code, not a table row, mostly letters."""
    s = line.strip()
    if not s or " | " in s or line.startswith(("    ", "\t")) or s.startswith(("#", "-", "*", "|")):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in s)
    return letters / len(s) > 0.8 and len(s.split()) >= 6


def prose_sentences(text: str) -> list[str]:
    out = []
    for para in text.split("\n\n"):
        if "\n" in para.strip() and not all(is_prose(ln) for ln in para.strip().split("\n")):
            continue
        para = " ".join(para.split())
        if not is_prose(para):
            continue
        for s in _SENT_SPLIT.split(para):
            n = len(s.split())
            if 6 <= n <= 45 and s.endswith((".", "!", "?")):
                out.append(s)
    return out


def terms_in(sentence: str) -> list[str]:
    """Technical terms worth blanking: identifiers with '_' or digits, ALLCAPS keywords, long words."""
    out = []
    for w in _WORD.findall(sentence):
        if "_" in w or (w.isupper() and len(w) >= 3) or (len(w) >= 9 and w.lower() not in STOPWORDS):
            out.append(w)
    return out


def term_shape(t: str) -> str:
    if "_" in t:
        return "identifier"
    if t.replace(".", "").isdigit():
        return "number"
    if t.isupper():
        return "keyword"
    return "word"


def near_length(options: list[str], n: int, rng: random.Random, k: int = 3) -> list[str]:
    """Distractor candidates whose lengths lie in a window of width max(4, n/2) that holds the
    answer's length n at a uniformly random place. Distractors centred on the answer's length would
    make the answer the middle one (the shortest or the longest only 1 time in 8), a tell that a
    length-biased model exploits. A small corpus with fewer than k in the window gets the k closest."""
    width = max(4, n / 2)
    lo = n - rng.uniform(0, width)
    near = [o for o in options if lo <= len(o) <= lo + width]
    return near if len(near) >= k else sorted(options, key=lambda o: (abs(len(o) - n), o))[:k]


def content_words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if len(w) >= 3 and w.lower() not in STOPWORDS]


def trivial_baselines(items: list[dict]) -> dict:
    """Accuracy of rules that ignore meaning on 4-option items (question, options, answer_index):
    chance, always the longest (or shortest: a summed log-likelihood favours short options) option, the
    option sharing most content words with the question."""
    if not items:
        return {}
    longest = sum(max(range(4), key=lambda i: len(it["options"][i])) == it["answer_index"] for it in items)
    shortest = sum(min(range(4), key=lambda i: len(it["options"][i])) == it["answer_index"] for it in items)
    q_words = [set(content_words(it["question"])) for it in items]
    overlap = sum(max(range(4), key=lambda i: len(set(content_words(it["options"][i])) & qw)) == it["answer_index"]
                  for it, qw in zip(items, q_words))
    return {"items": len(items), "chance": 0.25, "longest_option": round(longest / len(items), 3),
            "shortest_option": round(shortest / len(items), 3),
            "most_overlap": round(overlap / len(items), 3)}


def heading_of(chunk: Chunk) -> str:
    """The section's heading without its number ('26.1. SQL Dump' -> 'SQL Dump')."""
    first = chunk.title or chunk.text.strip().split("\n", 1)[0]
    return _HEADING_NUM.sub("", first.lstrip("# ").strip()).strip()


def lead_answer(chunk: Chunk, n: int = 2) -> str:
    """The section's first sentences, skipping bare cross-references ("See Section 9.1 for ...")."""
    return " ".join([s for s in chunk.sentences() if not s.startswith("See ")][:n])


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def definitions(chunk: Chunk) -> list[tuple[str, str]]:
    """(question, sentence) for each definitional sentence of the chunk ("X is a ...", "X provides ...")."""
    found = []
    for s in chunk.sentences():
        m = _DEFINITION.match(s)
        if not m or len(m.group("term")) < 3:
            continue
        first = m.group("term").split()[0].lower()
        # "Typically this feature is used ...", "A table is only ...": not definitions
        if first in STOPWORDS or first in _NOT_A_TERM or first.endswith("ly"):
            continue
        if m.group("verb") in ("is", "are") and not _DEFINING.match(m.group("rest")):
            continue
        verb, term = m.group("verb"), m.group("term")
        if term[0].isupper() and term[1:2].islower() and "_" not in term:
            term = term[0].lower() + term[1:]  # capitalised only because it starts the sentence
        if m.group("article") == "The ":
            term = "the " + term
        base = verb[:-3] + "y" if verb.endswith("ies") else verb[:-1]  # specifies -> specify
        q = f"What {verb} {term}?" if verb in ("is", "are") else f"What does {term} {base}?"
        found.append((q, s))
    return found


READING_HEADER = "Questions about the text above:"


def reading_text(chunk_text: str, pairs: list[tuple[str, str]]) -> str:
    """A reading-comprehension document: the passage, then its questions and answers."""
    qa = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)
    return f"{chunk_text.strip()}\n\n{READING_HEADER}\n\n{qa}"


class ExtractiveTeacher:
    """Builds items of each kind from a chunk and the corpus pool. `items()` returns dicts with the
    fields the synth stage validates: kind, messages (chat), answer, and kind-specific fields."""

    name = "extractive"

    def __init__(self, pool: Pool, seed: int = 0):
        self.pool, self.seed = pool, seed

    def _rng(self, chunk: Chunk, kind: str) -> random.Random:
        return random.Random(f"{self.seed}:{chunk.id}:{kind}")

    def items(self, chunk: Chunk, kind: str, n: int = 1) -> list[dict]:
        make = getattr(self, f"_{kind}")
        rng = self._rng(chunk, kind)
        out = []
        for _ in range(n * 3):  # a few attempts: some sentences do not fit a kind
            item = make(chunk, rng)
            if item and all(item["messages"] != o["messages"] for o in out):
                out.append(item)
            if len(out) >= n:
                break
        return out

    # -- kinds ---------------------------------------------------------------------------------------
    def _question(self, chunk: Chunk, rng: random.Random) -> tuple[str, str, str] | None:
        """(question, answer, template) from a definition, else from the heading."""
        defs = definitions(chunk)
        if defs and rng.random() < 0.7:
            q, a = rng.choice(defs)
            return q, a, "definition"
        heading, lead = heading_of(chunk), lead_answer(chunk)
        if heading and lead and len(heading.split()) <= 10:
            return f"What does the documentation say about {heading.rstrip('?')}?", lead, "heading"
        if defs:
            q, a = rng.choice(defs)
            return q, a, "definition"
        return None

    def _qa(self, chunk, rng):
        qa = self._question(chunk, rng)
        if not qa:
            return None
        q, a, template = qa
        return {"kind": "qa", "template": template, "question": q, "answer": a, "messages": _chat(q, a)}

    def _mcq(self, chunk, rng):
        # a term that occurs once in its sentence: a second, visible occurrence would give it away
        candidates = [(s, t) for s in chunk.sentences() for t in terms_in(s) if s.count(t) == 1]
        rng.shuffle(candidates)
        for sentence, term in candidates:
            shape = term_shape(term)
            # same shape, same capitalisation and, for words, the same ending (-tion, -ing, -s): a
            # distractor must fit the sentence's grammar, or any language model can rule it out
            others = [t for t in self.pool.terms.get(shape, []) if t != term and t.lower() != term.lower()
                      and t not in sentence and t[:1].isupper() == term[:1].isupper()
                      and (shape != "word" or t[-2:] == term[-2:])]
            if len(others) < 3:
                continue
            # distractors close in length to the answer, so "the longest option" is no tell
            distractors = rng.sample(near_length(others, len(term), rng), 3)
            options = distractors + [term]
            rng.shuffle(options)
            stem = sentence.replace(term, "_____", 1)
            letters = "ABCD"
            body = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
            q = f"Fill in the blank.\n\n{stem}\n\n{body}"
            ans = letters[options.index(term)]
            return {"kind": "mcq", "template": f"cloze-{shape}", "question": stem, "options": options,
                    "answer_index": options.index(term), "answer": term,
                    "messages": _chat(q, f"{ans}. {term}")}
        return None

    def _completion(self, chunk, rng):
        # the sentence before as context (as in LAMBADA/HellaSwag): the true ending must follow from
        # the text, not only from grammar; without it, both demo models scored below chance
        sents = chunk.sentences()
        picks = [i for i, s in enumerate(sents) if len(s.split()) >= 10]
        if not picks:
            return None
        i = rng.choice(picks)
        words = sents[i].split()
        cut = max(4, int(len(words) * 0.55))
        context, ending = " ".join(words[:cut]), " ".join(words[cut:])
        if i > 0:
            context = f"{sents[i - 1]} {context}"
        # wrong endings of about the same length (a summed log-likelihood favours short options) that
        # share about as many words with the context as the true one, so that neither "longest",
        # "shortest" nor "most (or least) overlap" gives the answer away
        ctx_words = set(content_words(context))
        candidates = set()
        # endings from the same section too: they share its topic words, so copying words from the
        # context does not pick the true one
        same = [(chunk.id + "/", t) for j, t in enumerate(sents) if j not in (i - 1, i)]
        for cid, other in same + rng.sample(self.pool.sentences, min(400, len(self.pool.sentences))):
            w = other.split()
            if cid == chunk.id or len(w) < 8:
                continue
            cand = " ".join(w[int(len(w) * 0.55):])
            if cand != ending:
                candidates.add(cand)
        target = len(ctx_words & set(content_words(ending)))
        ranked = near_length(sorted(candidates), len(ending), rng)
        rng.shuffle(ranked)
        wrong = sorted(ranked, key=lambda c: abs(len(ctx_words & set(content_words(c))) - target))[:3]
        # the true ending must not be the one sharing most words with the context
        if len(wrong) < 3 or max(len(ctx_words & set(content_words(c))) for c in wrong) < target:
            return None
        options = wrong + [ending]
        rng.shuffle(options)
        return {"kind": "completion", "template": "sentence-ending", "question": context, "options": options,
                "answer_index": options.index(ending), "answer": ending,
                "messages": _chat(f"Continue the text.\n\n{context}", ending)}

    def _summary(self, chunk, rng):
        lead = lead_answer(chunk, 2)
        if not lead or len(chunk.text) < 2 * len(lead):
            return None
        q = f"Summarize this section of the documentation.\n\n{chunk.text.strip()}"
        return {"kind": "summary", "template": "lead", "question": q, "answer": lead, "messages": _chat(q, lead)}

    def _instruction(self, chunk, rng):
        heading = heading_of(chunk)
        # an opening paragraph of real sentences: capitalised, not the heading itself, 12+ words
        paras = [p for p in chunk.text.split("\n\n") if is_prose(" ".join(p.split())) and p.strip()[0].isupper()
                 and heading not in p.split("\n")[0] and len(p.split()) >= 12 and p.strip().endswith(".")]
        if not heading or not paras or len(heading.split()) > 10:
            return None
        verb = rng.choice(["Explain", "Describe", "Give an overview of"])
        q = f"{verb} {heading}."
        a = " ".join(paras[0].split())
        return {"kind": "instruction", "template": "heading", "question": q, "answer": a, "messages": _chat(q, a)}

    def _evidence(self, chunk, rng):
        qa = self._question(chunk, rng)
        if not qa:
            return None
        q, a, template = qa
        sents = chunk.sentences()
        support = [s for s in sents if s in a] or sents[:1]
        quoted = " ".join(f'"{s}"' for s in support)
        return {"kind": "evidence", "template": f"quoted-{template}", "question": q, "answer": a,
                "rationale": f"The section \"{heading_of(chunk)}\" says: {quoted}", "messages": _chat(q, a)}

    def _reading(self, chunk, rng):
        sents = chunk.sentences()
        pairs: list[tuple[str, str]] = []
        heading = heading_of(chunk)
        if heading and len(heading.split()) <= 10:
            pairs.append(("What is a good title for this text?", heading))
        defs = definitions(chunk)
        pairs += rng.sample(defs, min(2, len(defs)))
        with_terms = [(s, t) for s in sents for t in terms_in(s)]
        if with_terms:
            s, t = rng.choice(with_terms)
            pairs.append((f"Write a sentence about {heading or 'this topic'} that uses the term \"{t}\".", s))
        long = [s for s in sents if len(s.split()) >= 10]
        if long:
            words = rng.choice(long).split()
            cut = max(4, int(len(words) * 0.55))
            pairs.append((f"How does the text complete this sentence: \"{' '.join(words[:cut])} ...\"?",
                          " ".join(words[cut:])))
        others = [x for cid, x in rng.sample(self.pool.sentences, min(20, len(self.pool.sentences)))
                  if cid != chunk.id and x not in sents]
        if sents and others:
            claims = [(rng.choice(sents), "Yes."), (rng.choice(others), "No.")]
            rng.shuffle(claims)
            pairs += [(f"Does the text support this statement: \"{c}\"?", a) for c, a in claims]
        if len(pairs) < 3:
            return None
        q = "Read the text and answer the questions about it."
        answer = "\n".join(a for _, a in pairs)
        return {"kind": "reading", "template": "mined", "question": q, "answer": answer, "pairs": pairs,
                "text": reading_text(chunk.text, pairs), "messages": _chat(q, answer)}

    def _preference(self, chunk, rng):
        qa = self._question(chunk, rng)
        if not qa:
            return None
        q, a, template = qa
        others = [ans for cid, ans in self.pool.answers if cid != chunk.id and ans != a]
        if not others:
            return None
        rejected = rng.choice(others)
        return {"kind": "preference", "template": f"other-section-{template}", "question": q, "answer": a,
                "prompt": _user(q), "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": rejected}], "messages": _chat(q, a)}
