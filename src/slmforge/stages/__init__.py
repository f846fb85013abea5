"""Stages in pipeline order. Each module: `NAME`, `INPUTS`, `Config`, `run(cfg, store, inputs=None)`.

Only names live here so that `slmforge --help` imports nothing heavy.
"""

STAGES: tuple[str, ...] = ("ingest", "curate", "tokenizer", "plan", "pretrain", "synth", "bench", "evaluate")
