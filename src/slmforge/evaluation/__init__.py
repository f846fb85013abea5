"""Evaluation: prompts, results, significance, the gate, the verdict, tables and charts."""
