"""One prompt shape per benchmark set: bench renders them into lm-eval task YAML, and whatever else
needs a set's prompt renders the same text from here. Training data never uses them (`template_of`).

The shapes are Python format strings over the set's JSONL fields; `task_yaml` turns `{field}` into
lm-eval's Jinja `{{field}}`, so the harness and `render` produce the same prompt for an item.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

QA_INSTRUCTION = "Fill in the blank with a term from the text above."
PROMPTS = {
    "mcq": "{question}\nAnswer:",
    "completion": "{question}",
    "qa": "{passage}\n\n" + QA_INSTRUCTION + "\n{question}\nAnswer:",
    "qa_open": "{passage}\n\nQuestion: {question}\nAnswer:",  # a model teacher's qa set: a real question
    "summarization": "{document}\n\nSummary:",
}
# The accuracy each choice set is judged by. mcq options are single terms of one shape, so their
# prior probabilities are alike and plain accuracy works. completion options are spans whose prior
# probability varies far more than the context changes it for a small model ("surface form
# competition", Holtzman et al. 2021): plain acc favours the likelier span whatever the context (on
# the scratch demo of commit b0b1944 both models scored chance on it), so the headline is acc_mutual_info, log P(ending | context) - log P(ending). All three are reported.
HEADLINE = {"mcq": "acc", "completion": "acc_mutual_info"}


def render(set_name: str, **fields: str) -> str:
    """The prompt of one item of a set, as the harness shows it to a model."""
    return PROMPTS[set_name].format(**fields)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile("(?s:.+)".join(map(re.escape, parts)))


def template_of(text: str) -> str | None:
    """The set whose prompt template `text` fills, if any: training data must not use these shapes
    (a benchmark would then measure format learning). `completion`'s template is the bare text, which
    every prompt fills, so it is checked item by item instead (tests/stages/test_sft.py)."""
    for name, template in PROMPTS.items():
        if template != "{question}" and _pattern(template).fullmatch(text):
            return name
    return None


def _doc_to_text(set_name: str) -> str:
    """The set's prompt as a YAML double-quoted Jinja string."""
    jinja = PROMPTS[set_name].replace("{", "{{").replace("}", "}}")
    return json.dumps(jinja)


def task_yaml(task: str, kind: str, data: Path, summary_tokens: int = 96) -> str:
    head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n" \
           "test_split: test\n"
    text = f"doc_to_text: {_doc_to_text(kind)}\n"
    if kind in ("mcq", "completion"):
        return head + ("output_type: multiple_choice\n" + text + 'doc_to_choice: "{{options}}"\n'
                       "doc_to_target: answer_index\ntarget_delimiter: \" \"\nmetric_list:\n"
                       "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: acc_mutual_info\n    aggregation: mean\n    higher_is_better: true\n")
    if kind in ("qa", "qa_open"):  # a term (stop at the sentence's end), or a one-sentence answer
        until, tokens = ('["\\n", "."]', 16) if kind == "qa" else ('["\\n"]', 48)
        return head + ("output_type: generate_until\n" + text + 'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
                       f"  until: {until}\n"
                       f"  max_gen_toks: {tokens}\n  do_sample: false\nprocess_results: !function utils.process_qa\n"
                       "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: f1\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: rougeL\n    aggregation: mean\n    higher_is_better: true\n")
    return head + ("output_type: generate_until\n" + text +
                   'doc_to_target: "{{summary}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n'
                   f"  max_gen_toks: {summary_tokens}\n"
                   "  do_sample: false\nprocess_results: !function utils.process_summary\n"
                   "metric_list:\n  - metric: rougeL\n    aggregation: mean\n    higher_is_better: true\n")


UTILS = '''"""Metrics for slmforge's generate_until tasks (written by the bench stage).

Exact match and token F1 over lower-cased word tokens (SQuAD's F1 without its article removal); ROUGE-L is Google's rouge_score
(with its Porter stemmer, as summarization papers report it), a dependency of lm-eval itself, so the task
folder runs wherever lm-eval runs."""
import re
from collections import Counter

from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _tokens(text):
    return re.findall(r"\\w+", text.lower())


def _f1(pred, ref):
    p, r = _tokens(pred), _tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _rouge_l(pred, ref):
    return _ROUGE.score(ref, pred)["rougeL"].fmeasure


def process_qa(doc, results):
    pred = results[0].strip()
    return {"exact_match": float(" ".join(_tokens(pred)) == " ".join(_tokens(doc["answer"]))),
            "f1": _f1(pred, doc["answer"]), "rougeL": _rouge_l(pred, doc["answer"])}


def process_summary(doc, results):
    return {"rougeL": _rouge_l(results[0], doc["summary"])}
'''
