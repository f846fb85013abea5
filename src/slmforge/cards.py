"""What a person or a hub reads about an exported model: the Hugging Face model card (README.md with the
Hub's YAML front matter and `model-index`), the flat scores of slmforge.json, and the Ollama Modelfile
that sits beside a GGUF."""

from __future__ import annotations

from slmforge.chat import EOS, IM_END, IM_START
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


def model_card(doc: dict, results: dict, model: str, chain: list[TrainedModel], license: str | None = None) -> str:
    """README.md: YAML front matter the Hugging Face Hub reads, then the model, its data, its scores and how
    to run it. `doc` is slmforge.json with the model's `shape`; `chain` its lineage, base first."""
    import yaml

    name, domain = doc["name"], doc["domain"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if license:
        front["license"] = license
    front["tags"] = ["slmforge", "llama", "small-language-model", domain] + (["gguf"] if doc["gguf"] else [])
    front["model_name"] = name
    # What a catalog or a person filtering cards needs without reading the body (the Hub keeps unknown keys)
    pretrain = next((c.meta for c in chain if c.stage == "pretrain"), {})
    front["domain"] = domain
    front["parameters"] = doc["params"]
    front["training_tokens"] = doc["training_tokens"]
    front["training_data"] = {"sources": pretrain.get("sources", []), "stages": [c.stage for c in chain]}
    if index := model_index(name, results, model, domain):
        front["model-index"] = index
    s = doc["shape"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", "",
             doc["description"], "",
             (f"A {doc['params'] / 1e6:.1f}M-parameter Llama-architecture model trained by slmforge "
              f"({' → '.join(c.stage for c in chain) or 'its stages'}) for **{domain}** text "
              f"({'a chat model' if doc['chat'] else 'a base model: it continues text'})."), "",
             "## Model", "", "| | |", "|---|---|",
             f"| parameters | {doc['params']:,} |", f"| layers | {s.get('depth')} |",
             f"| hidden size | {s.get('hidden_size')} |",
             f"| attention heads (key/value) | {s.get('num_attention_heads')} ({s.get('num_key_value_heads')}) |",
             f"| FFN size | {s.get('intermediate_size')} |", f"| context | {doc['context']} tokens |",
             f"| tokenizer | {doc['tokenizer']['type']}, {doc['tokenizer']['vocab_size']} tokens |", "",
             "## Training", "", "| model | stage | tokens | data |", "|---|---|---|---|"]
    for c in chain:
        m = c.meta
        data = ", ".join(m.get("sources", [])) if c.stage == "pretrain" else \
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (m.get("data") or {}).items())
        lines.append(f"| {c.model} | {c.stage} | {c.tokens:,} | {data} |")
    lines += ["", f"Training tokens in all: {doc['training_tokens']:,}. Lineage: "
              + ", ".join(f"{k}:{v}" for k, v in doc["lineage"]["stages"].items()) + ".", ""]
    lines += _score_lines(results, model, doc)
    run_lines = ["## How to run", "", "transformers:", "", "```python",
                 "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 f'tok = AutoTokenizer.from_pretrained("{name}")',
                 f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if doc["chat"]:
        run_lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
                      '                              return_tensors="pt", return_dict=True)']
    else:
        run_lines += ['ids = tok("The ", return_tensors="pt")']
    run_lines += ["out = model.generate(**ids, max_new_tokens=64)",
                  'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if doc["gguf"]:
        run_lines += ["llama.cpp and Ollama:", "", "```sh",
                      f"llama-cli -m {doc['gguf']} -p \"...\" -n 64" + (" -cnv" if doc["chat"] else ""),
                      f"ollama create {name} -f Modelfile && ollama run {name}", "```", ""]
        v = doc["gguf_verified"]
        run_lines += [("The GGUF was checked with llama.cpp: greedy tokens equal transformers' on the same weights."
                       if v else "The GGUF was not checked with llama.cpp (install llama-cpp-python to check it)."
                       if v is None else "The GGUF's llama.cpp check did not pass; see slmforge.json."), ""]
    lines += run_lines
    lines += ["## Limitations", "",
              (f"A model this small ({doc['params'] / 1e6:.1f}M parameters, {doc['training_tokens']:,} training "
               f"tokens) knows the surface of its {domain} corpus, not the facts behind it: it produces "
               "fluent-looking text that is often wrong. Check anything it says against the source. It was trained "
               f"{'on general text' if model == 'generalist' else f'mostly on {domain} text'}; it is not a "
               "general assistant, and it has no safety tuning. Scores are on small benchmarks made from held-out "
               "pages of the same corpus (see the intervals in the slmforge report)."), ""]
    return "\n".join(lines)


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
