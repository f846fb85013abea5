"""What a person or a hub reads about an exported model: the Hugging Face model card (README.md with the
Hub's YAML front matter and `model-index`), the lm-eval commands that reproduce its scores, the flat
scores of slmforge.json, and the Ollama Modelfile that sits beside a GGUF."""

from __future__ import annotations

from slmforge.models.chat import EOS, IM_END, IM_START
from slmforge.records import TrainedModel, set_of


def flat_scores(results: dict, model: str) -> dict:
    """Flat scores: '<set>/<metric>' for each benchmark metric, 'bpb/<source>' for each test split."""
    out = {}
    for task, ms in sorted(results.get("benchmarks", {}).get(model, {}).items()):
        for metric, v in ms.items():
            if isinstance(v, (int, float)):
                out[f"{set_of(task)}/{metric}"] = v
    for source, s in results.get("scores", {}).get(model, {}).items():
        out[f"bpb/{source}"] = s["bpb"]
    return out


SET_NAMES = {"mcq": "multiple choice", "completion": "completion choice", "qa": "question answering",
             "summarization": "summarization"}


def model_index(name: str, results: dict, model: str, domain: str) -> list[dict]:
    """The card's `model-index` (the Hub's evaluation-results format): one result per task, one per test split."""
    res = []
    for task, ms in sorted(results.get("benchmarks", {}).get(model, {}).items()):
        s = set_of(task)
        metrics = [{"type": k, "value": v, "name": k} for k, v in ms.items() if isinstance(v, (int, float))]
        if metrics:
            res.append({"task": {"type": "text-generation", "name": SET_NAMES.get(s, s)},
                        "dataset": {"type": task, "name": f"{domain} {SET_NAMES.get(s, s)} (slmforge bench, "
                                    "test split)", "split": "test"},
                        "metrics": metrics})
    for source, sc in results.get("scores", {}).get(model, {}).items():
        res.append({"task": {"type": "text-generation", "name": "language modeling"},
                    "dataset": {"type": f"slmforge_{source}", "name": f"{source} test split", "split": "test"},
                    "metrics": [{"type": "bpb", "value": sc["bpb"], "name": "bits per byte"},
                                {"type": "perplexity", "value": sc["ppl"], "name": "perplexity"}]})
    return [{"name": name, "results": res}] if res else []


def eval_commands(task_types: dict[str, str], cfg: dict, chat: bool) -> dict:
    """How evaluate ran the benchmarks, as lm-eval commands to run from the export folder (its `eval/`
    holds the tasks). `task_types` is {task: lm-eval output_type}, `cfg` evaluate's resolved config.
    What evaluate does: lm-eval's HF model on the CPU (evaluate loads the weights on the CPU and hands
    them over), weights in evaluate.dtype with log-probabilities in float32 (slmforge.models.lm.float_logits,
    softmax_dtype here), the task YAMLs' own zero-shot prompts, all seeds 0, evaluate.batch_size,
    evaluate.bench_limit items at most; a chat model's generation tasks through its chat template, its
    choice tasks on raw text, like a base model's."""
    dtype, batch, limit = cfg.get("dtype") or "float32", cfg.get("batch_size") or 8, cfg.get("bench_limit")
    args = "pretrained=.,dtype=" + dtype + (",softmax_dtype=float32" if dtype != "float32" else "")
    base = (f"lm-eval run --model hf --model_args {args} --device cpu --include_path eval --batch_size {batch} "
            "--seed 0,0,0,0" + (f" --limit {limit}" if limit else ""))
    choice = [t for t, kind in task_types.items() if kind != "generate_until"]
    generation = [t for t, kind in task_types.items() if kind == "generate_until"]
    parts = [(choice, False), (generation, True)] if chat else [(choice + generation, False)]
    return {"include_path": "eval", "tasks": sorted(task_types), "chat_template": generation if chat else [],
            "generation": generation, "limit": limit,
            "commands": [f"{base} --tasks {' '.join(p)}" + (" --apply_chat_template" if c else "")
                         for p, c in parts if p]}


def model_card(doc: dict, results: dict, model: str, chain: list[TrainedModel], license: str | None = None) -> str:
    """README.md: YAML front matter the Hugging Face Hub reads, then the model, its data, its scores and how
    to run it. `doc` is slmforge.json with the model's `shape`; `chain` its lineage, base first."""
    import yaml

    front = _front_matter(doc, results, model, chain, license)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += _model_lines(doc, chain)
    lines += _training_lines(doc, chain)
    lines += _score_lines(results, model, doc)
    lines += _run_lines(doc)
    lines += _reproduce_lines(doc, results, model)
    lines += _limitation_lines(doc)
    return "\n".join(lines)


def _front_matter(doc: dict, results: dict, model: str, chain: list[TrainedModel], license: str | None) -> dict:
    """The Hub's keys, then what a catalog or a person filtering cards needs without reading the body (the
    Hub keeps unknown keys), then the scores as `model-index`."""
    name, domain = doc["name"], doc["domain"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if license:
        front["license"] = license
    front["tags"] = ["slmforge", "llama", "small-language-model", domain] + (["gguf"] if doc["gguf"] else [])
    front["model_name"] = name
    pretrain = next((c.meta for c in chain if c.stage == "pretrain"), {})
    front["domain"] = domain
    front["parameters"] = doc["params"]
    front["training_tokens"] = doc["training_tokens"]
    front["training_data"] = {"sources": pretrain.get("sources", []), "stages": [c.stage for c in chain]}
    if index := model_index(name, results, model, domain):
        front["model-index"] = index
    return front


def _model_lines(doc: dict, chain: list[TrainedModel]) -> list[str]:
    """The title, the description and ## Model: the shape."""
    s = doc["shape"]
    return [f"# {doc['name']}", "", doc["description"], "",
            (f"A {doc['params'] / 1e6:.1f}M-parameter Llama-architecture model trained by slmforge "
             f"({' → '.join(c.stage for c in chain) or 'its stages'}) for **{doc['domain']}** text "
             f"({'a chat model' if doc['chat'] else 'a base model: it continues text'})."), "",
            "## Model", "", "| | |", "|---|---|",
            f"| parameters | {doc['params']:,} |", f"| layers | {s.get('depth')} |",
            f"| hidden size | {s.get('hidden_size')} |",
            f"| attention heads (key/value) | {s.get('num_attention_heads')} ({s.get('num_key_value_heads')}) |",
            f"| FFN size | {s.get('intermediate_size')} |", f"| context | {doc['context']} tokens |",
            f"| tokenizer | {doc['tokenizer']['type']}, {doc['tokenizer']['vocab_size']} tokens |", ""]


def _training_lines(doc: dict, chain: list[TrainedModel]) -> list[str]:
    """## Training: each model of the lineage, its stage, tokens and data."""
    lines = ["## Training", "", "| model | stage | tokens | data |", "|---|---|---|---|"]
    for c in chain:
        m = c.meta
        data = ", ".join(m.get("sources", [])) if c.stage == "pretrain" else \
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (m.get("data") or {}).items())
        lines.append(f"| {c.model} | {c.stage} | {c.tokens:,} | {data} |")
    return lines + ["", f"Training tokens in all: {doc['training_tokens']:,}. Lineage: "
                    + ", ".join(f"{k}:{v}" for k, v in doc["lineage"]["stages"].items()) + ".", ""]


def _run_lines(doc: dict) -> list[str]:
    """## How to run: transformers, and llama.cpp and Ollama when there is a GGUF."""
    name = doc["name"]
    lines = ["## How to run", "", "transformers:", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'tok = AutoTokenizer.from_pretrained("{name}")',
             f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if doc["chat"]:
        # the template writes BOS (slmforge.models.chat): apply_chat_template(tokenize=True) adds no second one
        lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
                  '                              return_tensors="pt", return_dict=True)']
    else:
        lines += ['ids = tok("The ", return_tensors="pt")']
    lines += ["out = model.generate(**ids, max_new_tokens=64)",
              'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if doc["chat"]:
        lines += [("The chat template (chat_template.jinja, also in tokenizer_config.json) is plain Jinja that "
                   "MiniJinja-based servers and llama.cpp read, and it writes the BOS token itself: a server or "
                   "script that renders it to text must tokenize that text without special tokens "
                   "(add_special_tokens=False, as transformers' apply_chat_template, vLLM and llama.cpp do), "
                   "or the prompt starts with two BOS tokens."), ""]
    if doc["gguf"]:
        lines += ["llama.cpp and Ollama:", "", "```sh",
                  f"llama-cli -m {doc['gguf']} -p \"...\" -n 64" + (" -cnv" if doc["chat"] else ""),
                  f"ollama create {name} -f Modelfile && ollama run {name}", "```", ""]
        lines += [_gguf_line(doc), ""]
    return lines


def _limitation_lines(doc: dict) -> list[str]:
    domain = doc["domain"]
    return ["## Limitations", "",
            (f"A model this small ({doc['params'] / 1e6:.1f}M parameters, {doc['training_tokens']:,} training "
             f"tokens) knows the surface of its {domain} corpus, not the facts behind it: it produces "
             "fluent-looking text that is often wrong. Check anything it says against the source. It was trained "
             f"{'on general text' if domain == 'general' else f'mostly on {domain} text'}; it is not a "
             "general assistant, and it has no safety tuning. Scores are on small benchmarks made from held-out "
             "pages of the same corpus (see the intervals in the slmforge report)."), ""]


def _score_lines(results: dict, model: str, doc: dict) -> list[str]:
    bench = results.get("benchmarks", {})
    if model not in bench and model not in results.get("scores", {}):
        return ["## Scores", "", ("evaluate did not score this model; add it to `evaluate.models` and run "
                                  "`slmforge evaluate` to get scores on the card."), ""]
    cols = [model] + (["generalist"] if model != "generalist" and "generalist" in bench else [])
    lines = ["## Scores", "", "Domain benchmarks (lm-evaluation-harness, test split) and bits per byte on each "
             "source's test split (lower is better). " + ("The generalist is a same-size model trained on general "
                                                          "text, for comparison." if len(cols) > 1 else ""), "",
             "| task · metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    headline = results.get("headline", {})
    for task, ms in sorted(bench.get(model, {}).items()):
        s = set_of(task)
        for metric, v in ms.items():
            if not isinstance(v, (int, float)):
                continue
            mark = " (headline)" if headline.get(s) == metric else ""
            cells = [f"{bench.get(c, {}).get(task, {}).get(metric, float('nan')):.3f}" for c in cols]
            lines.append(f"| {s} · {metric}{mark} | " + " | ".join(cells) + " |")
    for source in results.get("scores", {}).get(model, {}):
        cells = [f"{results['scores'].get(c, {}).get(source, {}).get('bpb', float('nan')):.3f}" for c in cols]
        lines.append(f"| bits per byte · {source} | " + " | ".join(cells) + " |")
    if sel := results.get("selection", {}).get(model):
        lines += ["", f"Weights: the `{sel['chosen']}` checkpoint, chosen on the dev set by {sel['metric']}."]
    return lines + [""]


def _gguf_line(doc: dict) -> str:
    """What the GGUF's llama.cpp check did, from slmforge.json's gguf_verified and gguf_check."""
    v, c = doc["gguf_verified"], doc.get("gguf_check") or {}
    if v is None:
        return ("The GGUF was not checked with llama.cpp: export.verify was off or xllamacpp (llama.cpp's prebuilt "
                "binding) was not installed when it was exported; `pip install xllamacpp` and export again to "
                "check it.")
    if not v:
        return "The GGUF's llama.cpp check did not pass; see slmforge.json."
    what = (f"its greedy tokens equal transformers' on the same weights ({c.get('tokens_per_prompt')} tokens per "
            "prompt)" if c.get("exact") else f"{c.get('outtype')} weights differ from the HF ones by design: "
            f"{c.get('agreement', 0):.0%} of transformers' greedy tokens agree")
    return (f"The GGUF was checked with llama.cpp ({c.get('engine')}) when it was exported: {what}, its "
            "tokenization equals the HF tokenizer's" + (", and llama.cpp renders and tokenizes the chat template "
                                                       "to transformers' tokens" if doc["chat"] else "") + ".")


def _reproduce_lines(doc: dict, results: dict, model: str) -> list[str]:
    """## Reproducing the scores: the lm-eval commands (from slmforge.json's `eval`) and how each number is
    scored; bits per byte, slmforge's own scorer, is described."""
    ev = doc.get("eval")
    if not ev:
        return []
    lines = ["## Reproducing the scores", "",
             (f"The benchmark scores come from lm-evaluation-harness on the bench stage's test tasks, copied into "
             f"`{ev['include_path']}/` (task YAML, JSONL data and `utils.py`). From this folder:"), "", "```sh"]
    lines += ev["commands"] + ["```", ""]
    lines += ["How each task is scored (zero-shot, the prompt of the task's YAML"
              + (f", its first {ev['limit']} items" if ev.get("limit") else "") + "):", ""]
    bench = results.get("benchmarks", {}).get(model, {})
    choice = [t for t in ev["tasks"] if t not in ev["generation"]]
    if choice:
        lines.append(f"- {', '.join(f'`{t}`' for t in choice)} (choice): the log-likelihood of each option after the "
                     "raw prompt (no chat template" + (", for this chat model too" if doc["chat"] else "") + "); acc "
                     "picks the likeliest option, acc_norm the likeliest per character, acc_mutual_info the one whose "
                     "likelihood the prompt raises most (log P(option | prompt) - log P(option)).")
    for t in ev["tasks"]:
        if t in choice:
            continue
        how = "through the chat template (`--apply_chat_template`)" if t in ev["chat_template"] else \
            "on the raw prompt"
        metrics = ", ".join(k for k, v in bench.get(t, {}).items() if k != "empty") or "see its YAML"
        lines.append(f"- `{t}` ({SET_NAMES.get(set_of(t), set_of(t))}): a greedy answer {how}, up to the task's "
                     f"stop sequence, scored by `eval/utils.py` against the reference ({metrics}).")
    if results.get("scores", {}).get(model):
        lines += [("- bits per byte: not an lm-eval task. slmforge's evaluate scores each source's test split "
                  "(documents as BOS + tokens, in windows of the model's context up to 1024 tokens, BOS and EOS "
                  "not scored): summed negative log-likelihood in bits over the text's UTF-8 bytes. The test "
                  "split is not in this folder; `slmforge evaluate` in the run that made the model recomputes it.")]
    return lines + [""]


def modelfile(gguf_name: str, chat: bool, context: int, template: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it. Chat models get the ChatML template (and the `[label] `
    prefix on user turns when the model's chat template adds it: rationale-distilled models); base models
    complete the raw prompt."""
    lines = [f"FROM ./{gguf_name}", ""]
    if chat:
        label = "[label] " if template and "[label]" in template else ""
        user = f'{{{{ if eq .Role "user" }}}}{label}{{{{ end }}}}' if label else ""
        # Ollama's documented ChatML template (docs/template.md); system turns come in .Messages too
        lines += [f'TEMPLATE """{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}',
                  f"{user}{{{{ .Content }}}}{IM_END}", f"{{{{ end }}}}{IM_START}assistant", '"""',
                  f'PARAMETER stop "{IM_END}"']
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""']
    lines += [f'PARAMETER stop "{EOS}"', f"PARAMETER num_ctx {context}", "PARAMETER temperature 0.7",
              "PARAMETER repeat_penalty 1.1", ""]
    return "\n".join(lines)
