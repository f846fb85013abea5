"""Stages in pipeline order. Each module: `NAME`, `INPUTS`, `Config`, `run(cfg, store, inputs=None)`,
and optionally `needs(cfg)` when the stages it reads depend on its settings.

Only names live here so that `slmforge --help` imports nothing heavy.
"""

# synth before pretrain: it reads only curate, and pretrain can mix in its reading-comprehension texts
STAGES: tuple[str, ...] = ("ingest", "curate", "tokenizer", "plan", "synth", "pretrain", "compress",
                           "sft", "dpo", "bench",
                           "evaluate", "report", "export")
# Recipe sections for long-running services: validated with the stages, started by their own verb
# (`slmforge serve --recipe R`), never by `slmforge run`.
SERVICES: tuple[str, ...] = ("serve",)
