"""Synthetic data: the teacher client, guided synthesis, extractive items, the JSON-answer check."""
