"""Deployment: GGUF writing, model cards, the model catalog."""
