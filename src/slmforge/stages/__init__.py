"""Stages in pipeline order. Each module: `NAME`, `INPUTS`, `Config`, `run(cfg, store, inputs=None)`,
and optionally `needs(cfg)` when the stages it reads depend on its settings.

Only names (and each stage verb's one-line help) live here so that `slmforge --help` imports nothing heavy.
"""

# synth before pretrain: it reads only curate, and pretrain can mix in its reading-comprehension texts
STAGES: tuple[str, ...] = ("ingest", "curate", "tokenizer", "plan", "synth", "pretrain", "compress",
                           "sft", "dpo", "bench",
                           "evaluate", "report", "export")
# Recipe sections for long-running services: validated with the stages, started by their own verb
# (`slmforge serve --recipe R`), never by `slmforge run`.
SERVICES: tuple[str, ...] = ("serve",)

# What each stage does, as `slmforge --help` lists it (`slmforge STAGE RECIPE` runs one stage).
STAGE_HELP: dict[str, str] = {
    "ingest": "read files/folders/globs into Document shards (Parquet)",
    "curate": "quality filters, dedup, PII redaction, train/val/test split (datatrove)",
    "tokenizer": "train a byte-level BPE on the train split and compare it with a general one",
    "plan": "what model should I train? (also without a recipe: slmforge plan --hours 24 --device h100 ...)",
    "synth": "synthetic QA/MCQ/completion/summary/instruction/rationale or evidence/preference/reading data from "
             "the train split",
    "pretrain": "train the specialist and a same-size generalist baseline",
    "compress": "prune the teacher (a DAPT specialist or a base) to a smaller student with domain importance, then "
                "distil it on the teacher's logits (and compare with LM-only and scratch students)",
    "sft": "fine-tune the specialist on the synth data (trl SFTTrainer), plain and with rationale distillation",
    "dpo": "preference-optimise the SFT model on the synth pairs (trl DPOTrainer)",
    "bench": "domain benchmarks (mcq, completion, qa, summarization) from the test split, as lm-eval tasks",
    "evaluate": "every model on the benchmarks (lm-eval), bits-per-byte on each test split, the quality gate",
    "report": "one HTML page and a Markdown summary of the run: data, tokenizer, models, scores, charts",
    "export": "Hugging Face folders with model cards, GGUF files and Ollama Modelfiles; adds them to the catalog",
}
