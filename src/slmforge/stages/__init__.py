"""Stages in pipeline order. Each module: `NAME`, `INPUTS`, `Config`, `run(cfg, store, inputs=None)`,
and optionally `needs(cfg)` when the stages it reads depend on its settings.

Only names live here so that `slmforge --help` imports nothing heavy.
"""

STAGES: tuple[str, ...] = ("ingest", "curate", "tokenizer", "plan", "pretrain", "synth", "sft", "dpo", "bench",
                           "evaluate", "report")
