"""Evaluation: prompts, results, significance, the gate, the verdict and charts."""
