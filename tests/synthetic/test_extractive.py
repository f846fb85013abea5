"""The extractive teacher (slmforge/synthetic/extractive.py): items grounded in their chunk, distractors from the
corpus pool, deterministic per chunk; on 40 pages of the shipped PostgreSQL manual and on generated text."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from slmforge.synthetic.extractive import (
    Chunk,
    ExtractiveTeacher,
    Pool,
    content_words,
    heading_of,
    is_prose,
    lead_answer,
    near_length,
    prose_sentences,
    term_shape,
    terms_in,
    trivial_baselines,
)
from tests.conftest import DATA

KINDS = ["qa", "mcq", "completion", "summary", "instruction", "evidence", "preference", "reading"]


@pytest.fixture(scope="module")
def chunks() -> list[Chunk]:
    """40 manual pages (the same slice as conftest's small_corpus, and 10 more), a chunk each."""
    with gzip.open(DATA / "postgresql_docs.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for i, line in zip(range(140), f) if i >= 100]
    return [Chunk(f"{d['id']}#0", d["id"], d["source"], d["title"], d["text"]) for d in docs]


@pytest.fixture(scope="module")
def pool(chunks) -> Pool:
    return Pool.build(chunks)


@pytest.fixture(scope="module")
def made(chunks, pool) -> dict[str, list[tuple[Chunk, dict]]]:
    """Every kind of item for every chunk, with the seed 0: {kind: [(chunk, item)]}."""
    teacher = ExtractiveTeacher(pool, seed=0)
    return {k: [(c, it) for c in chunks for it in teacher.items(c, k)] for k in KINDS}


def _flat(text: str) -> str:
    return " ".join(text.split())


# ---- text helpers -------------------------------------------------------------------------------
def test_prose_sentences_keep_running_text_and_drop_code_tables_and_headings():
    text = ("# 3.1. Backups\n\n"
            "A base backup copies the whole data directory of the cluster. It can be taken while the "
            "server runs! Is it consistent without the WAL files?\n\n"
            "    pg_basebackup -D /var/backups/base -Ft -z -P --checkpoint=fast\n\n"
            "name | type | default value of the setting\n\n"
            "Too short.\n\n"
            "This sentence has no final stop and so it is not taken as one")
    assert prose_sentences(text) == [
        "A base backup copies the whole data directory of the cluster.",
        "It can be taken while the server runs!",
        "Is it consistent without the WAL files?"]
    long = " ".join(["word"] * 46) + "."
    assert prose_sentences(long) == [] and prose_sentences(long[5:]) == [long[5:]]  # 6 to 45 words
    assert prose_sentences("Only five words are here. The next sentence has six words.") == [
        "The next sentence has six words."]
    assert not is_prose('x := f(a[1], b->c) + g("d");') and not is_prose("- a list item of six words")
    assert is_prose("The server writes every change to the log first.")


def test_terms_are_identifiers_keywords_and_long_words_each_with_its_shape():
    s = "Set max_wal_size with ALTER SYSTEM; WAL replay of checkpoints lasts 15.5 s on a DB."
    assert terms_in(s) == ["max_wal_size", "ALTER", "SYSTEM", "WAL", "checkpoints"]  # not DB (2), 15.5, replay
    assert [term_shape(t) for t in ("max_wal_size", "15.5", "2024", "VACUUM", "checkpoints")] == [
        "identifier", "number", "number", "keyword", "word"]
    assert terms_in("The cat sat on the mat and was not seen.") == []


def test_content_words_are_lowercased_and_drop_stopwords_and_short_words():
    assert content_words("The WAL is written to the disk by a Writer, as of 9") == [
        "wal", "written", "disk", "writer"]


@pytest.mark.parametrize("title, text, heading", [
    ("26.1. SQL Dump", "", "SQL Dump"),
    ("F.1. adminpack", "", "adminpack"),
    ("A.2.1. Release Notes", "", "Release Notes"),
    ("Part III. Server Administration", "", "Part III. Server Administration"),  # not a section number
    ("", "# 12 Full Text Search\n\nText.", "Full Text Search"),  # no title: the text's first line
])
def test_heading_of_drops_the_section_number(title, text, heading):
    assert heading_of(Chunk("c", "d", "s", title, text)) == heading


def test_lead_answer_skips_bare_cross_references():
    c = Chunk("c", "d", "s", "T", "See Section 9.1 for the operators that are described there. The server "
                                  "keeps a log of every change it makes. Each record of the log has a number. "
                                  "The log is replayed after a crash of the server.")
    assert lead_answer(c) == "The server keeps a log of every change it makes. Each record of the log has a number."
    assert lead_answer(c, 1) == "The server keeps a log of every change it makes."


def test_near_length_puts_the_answer_anywhere_in_the_window_and_falls_back_to_the_closest():
    import random

    options = ["x" * n for n in range(1, 40)]
    positions = set()
    for seed in range(50):
        near = near_length(options, 20, random.Random(seed))
        lengths = [len(o) for o in near]
        assert len(near) >= 3 and max(lengths) - min(lengths) <= 10  # window width max(4, 20 / 2)
        positions.add(sum(n < 20 for n in lengths))  # how many candidates are shorter than the answer
    assert len(positions) > 5  # not always in the middle: the answer's length is no tell
    assert near_length(["aa", "bbbbbbbbbbbbbbbbbbbb", "c", "dddd"], 30, random.Random(0)) == [
        "bbbbbbbbbbbbbbbbbbbb", "dddd", "aa"]  # too few in the window: the 3 closest in length


# ---- items --------------------------------------------------------------------------------------
def test_every_kind_is_made_on_the_manual(made, chunks):
    counts = {k: len(v) for k, v in made.items()}
    assert all(n >= len(chunks) // 3 for n in counts.values()), counts
    for kind, pairs in made.items():
        for _, it in pairs:
            assert it["kind"] == kind and it["template"] and it["answer"]
            assert [m["role"] for m in it["messages"]] == ["user", "assistant"]


def test_qa_answers_are_sentences_of_their_chunk_about_the_question(made):
    templates = set()
    for chunk, it in made["qa"]:
        templates.add(it["template"])
        assert it["messages"] == [{"role": "user", "content": it["question"]},
                                  {"role": "assistant", "content": it["answer"]}]
        if it["template"] == "definition":
            assert it["answer"] in chunk.sentences()
            m = re.fullmatch(r"What (?:is|are) (.+)\?|What does (.+) \w+\?", it["question"])
            assert m and (m[1] or m[2]).lower() in it["answer"].lower(), it
        else:
            assert it["template"] == "heading" and it["answer"] == lead_answer(chunk)
            assert heading_of(chunk) in it["question"]
    assert templates == {"definition", "heading"}


def test_mcq_blanks_a_term_of_the_sentence_and_draws_distinct_distractors_from_the_pool(made, pool):
    shapes = set()
    for chunk, it in made["mcq"]:
        opts, answer = it["options"], it["answer"]
        assert len(opts) == 4 and len(set(o.lower() for o in opts)) == 4  # distinct, in any case
        assert opts[it["answer_index"]] == answer
        assert it["question"].count("_____") == 1
        sentence = it["question"].replace("_____", answer)
        assert sentence in chunk.sentences() and sentence.count(answer) == 1 and answer in terms_in(sentence)
        shape = term_shape(answer)
        shapes.add(shape)
        assert it["template"] == f"cloze-{shape}"
        for d in (o for o in opts if o != answer):
            assert d in pool.terms[shape] and d not in sentence  # same shape, not a visible give-away
            assert d[:1].isupper() == answer[:1].isupper()
            assert shape != "word" or d[-2:] == answer[-2:]  # the same ending: it fits the grammar
        assert it["messages"][1]["content"] == f"{'ABCD'[it['answer_index']]}. {answer}"
        assert f"\n{'ABCD'[it['answer_index']]}. {answer}" in it["messages"][0]["content"]
    assert {"word", "identifier"} <= shapes
    # distractors close in length to the answer (a window of max(4, n/2) holding the answer's length n)
    close = [all(abs(len(o) - len(it["answer"])) <= max(4, len(it["answer"]) / 2) for o in it["options"])
             for _, it in made["mcq"]]
    assert sum(close) >= 0.95 * len(close)  # all but a few (fewer than 3 in the window: the 3 closest)


def test_completion_continues_a_sentence_of_the_chunk_against_endings_of_other_sentences(made, pool):
    tails = [s for _, s in pool.sentences]
    for chunk, it in made["completion"]:
        opts, ending = it["options"], it["answer"]
        assert len(set(opts)) == 4 and opts[it["answer_index"]] == ending
        sents = chunk.sentences()
        [i] = [i for i, s in enumerate(sents) if f"{it['question']} {ending}".endswith(s)]
        assert it["question"] == " ".join(sents[max(0, i - 1):i + 1])[:-len(ending) - 1]  # and the sentence before
        for wrong in (o for o in opts if o != ending):
            assert any(s.endswith(wrong) for s in tails)
            assert wrong not in it["question"]  # not the end of the sentence before, given as context
        # the true ending does not share the most words with the context
        ctx = set(content_words(it["question"]))
        overlap = [len(ctx & set(content_words(o))) for o in opts]
        assert max(overlap[i] for i in range(4) if i != it["answer_index"]) >= overlap[it["answer_index"]]


def test_reading_comprehension_text_is_the_passage_then_questions_mined_from_it(made, pool):
    from slmforge.synthetic.extractive import READING_HEADER

    assert len(made["reading"]) > 20
    for chunk, it in made["reading"]:
        head, _, qa = it["text"].partition(f"\n\n{READING_HEADER}\n\n")
        assert head == chunk.text.strip() and len(it["pairs"]) >= 3
        assert qa == "\n\n".join(f"Q: {q}\nA: {a}" for q, a in it["pairs"])
        flat = _flat(chunk.text)
        for q, a in it["pairs"]:
            claim = q.partition('this statement: "')[2].removesuffix('"?')
            if claim:  # supported statements come from this chunk, unsupported ones from another
                assert (a == "Yes.") == (claim in flat)
            elif a not in ("Yes.", "No."):
                assert a in flat or a == heading_of(chunk)


def test_summary_instruction_evidence_and_preference_are_taken_from_the_text(made, pool):
    for chunk, it in made["summary"]:
        assert it["answer"] == lead_answer(chunk, 2) and chunk.text.strip() in it["question"]
    for chunk, it in made["instruction"]:
        assert it["question"].endswith(f" {heading_of(chunk)}.")
        assert it["answer"] in [_flat(p) for p in chunk.text.split("\n\n")]
    assert made["evidence"]
    for chunk, it in made["evidence"]:  # quoted evidence, called what it is: no pretended reasoning
        support = [s for s in chunk.sentences() if s in it["answer"]]  # the answer is made of them
        assert support and it["rationale"] == (f'The section "{heading_of(chunk)}" says: '
                                               + " ".join(f'"{s}"' for s in support))
        assert it["template"].startswith("quoted-")
    answers = dict(pool.answers)
    for chunk, it in made["preference"]:
        chosen, rejected = it["chosen"][0]["content"], it["rejected"][0]["content"]
        assert chosen == it["answer"] != rejected and it["prompt"] == [{"role": "user", "content": it["question"]}]
        assert rejected in answers.values() and answers.get(chunk.id) != rejected  # from another section


def test_the_same_seed_makes_the_same_items_whatever_else_was_asked_before(chunks, pool, made):
    teacher = ExtractiveTeacher(pool, seed=0)
    for kind in KINDS:  # other chunks first, in reverse: the RNG is per chunk and kind
        again = [(c, it) for c in reversed(chunks) for it in teacher.items(c, kind)][::-1]
        assert [it for _, it in again] == [it for _, it in made[kind]]
    other = ExtractiveTeacher(pool, seed=1)
    changed = sum(a != b for c in chunks for a, b in zip(teacher.items(c, "mcq"), other.items(c, "mcq")))
    assert changed > len(chunks) // 4


def test_asking_for_several_items_gives_distinct_ones(chunks, pool):
    teacher = ExtractiveTeacher(pool, seed=0)
    for c in chunks:
        items = teacher.items(c, "mcq", n=3)
        assert len(items) <= 3 and len({json.dumps(it["messages"]) for it in items}) == len(items)
        assert teacher.items(c, "mcq", n=1) == items[:1]
    assert max(len(teacher.items(c, "mcq", n=3)) for c in chunks) == 3


def test_a_chunk_without_prose_or_terms_gives_no_items(pool):
    code = Chunk("code", "d", "s", "", "    SELECT 1;\n    SELECT 2;\n\nname | type\n\n# Only a heading")
    assert code.sentences() == [] and Pool.build([code]).sentences == []
    teacher = ExtractiveTeacher(pool, seed=0)
    assert all(teacher.items(code, k) == [] for k in KINDS)
    plain = Chunk("plain", "d", "s", "Cats", "The cat sat on the mat and did not move at all today.")
    assert teacher.items(plain, "mcq") == []  # no term to blank
    alone = Pool.build([plain])
    assert ExtractiveTeacher(alone).items(plain, "qa")  # a question about the heading, but:
    assert ExtractiveTeacher(alone).items(plain, "preference") == []  # no other section to reject from
    assert ExtractiveTeacher(alone).items(plain, "completion") == []  # no other endings


def test_mcq_needs_three_distractors_of_the_same_shape():
    a = Chunk("a", "d", "s", "A", "The parameter work_mem limits the memory of each sort operation.")
    b = Chunk("b", "d", "s", "B", "The parameter shared_buffers sets the memory for the shared cache.")
    few = Pool.build([a, b])
    assert few.terms["identifier"] == ["work_mem", "shared_buffers"]
    assert ExtractiveTeacher(few).items(a, "mcq") == []
    c = Chunk("c", "d", "s", "C", "The parameter temp_buffers sets the memory for temporary tables.")
    d = Chunk("e", "d", "s", "E", "The parameter maintenance_work_mem limits the memory for VACUUM runs.")
    [item] = ExtractiveTeacher(Pool.build([a, b, c, d])).items(a, "mcq")
    assert item["answer"] == "work_mem"
    assert sorted(item["options"]) == sorted(["work_mem", "shared_buffers", "temp_buffers", "maintenance_work_mem"])


# ---- trivial baselines --------------------------------------------------------------------------
def test_trivial_baselines_score_the_rules_that_ignore_meaning():
    def item(question, options, answer_index):
        return {"question": question, "options": options, "answer_index": answer_index}

    items = [
        # the longest option, and the one sharing most words with the question ("which" is a stopword)
        item("Which limit on sort memory?", ["a", "bb", "ccc", "the sort memory limit"], 3),
        # the longest option; no word shared (a tie: the first option counts as the most overlap)
        item("Nothing shared here", ["aa", "bbb", "cccccccc", "d"], 2),
        # the longest option, sharing a word
        item("Which checkpoint setting?", ["aa", "b", "c", "checkpoint"], 3),
        # the shortest option
        item("Pick one", ["yyyy", "x", "zzzzz", "wwwwww"], 1),
    ]
    assert trivial_baselines(items) == {"items": 4, "chance": 0.25, "longest_option": 0.75,
                                        "shortest_option": 0.25, "most_overlap": 0.5}
    assert trivial_baselines([]) == {}


def test_the_manuals_mcq_items_defeat_the_trivial_rules(made):
    scores = trivial_baselines([it for _, it in made["mcq"]])
    assert scores["items"] == len(made["mcq"])
    assert scores["longest_option"] < 0.5 and scores["shortest_option"] < 0.5 and scores["most_overlap"] < 0.5
