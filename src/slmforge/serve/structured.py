"""Structured outputs: `response_format` {type: json_object} and {type: json_schema, json_schema: {name,
schema, strict}} on chat completions, enforced by constrained decoding.

llguidance (the grammar engine behind llama.cpp's, vLLM's and SGLang's structured outputs) compiles the
schema into a grammar over the model's own tokens; before each token, a `Grammar` masks out every token the
grammar cannot take next, so the completion always parses and validates against the schema (unless it is cut
short by max_tokens: finish_reason "length", as OpenAI does). JSON is compact (no free whitespace), so a
small model cannot spend its budget on blank space. The per-token cost of the mask is measured in
benchmarks/serve_load.py (the structured-outputs table)."""

from __future__ import annotations

import json
import threading

from slmforge.serve.schemas import ApiError

JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JSON compiler: "," and ":" with no spaces


def grammar_for(response_format: dict | None) -> str | None:
    """The llguidance grammar for a request's response_format; None for plain text; ApiError 400 naming the
    field when the schema is not a valid JSON Schema."""
    if not response_format or response_format.get("type") == "text":
        return None
    import llguidance

    kind = response_format.get("type")
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object {name, schema, strict}",
                           param="response_format.json_schema")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           param="response_format.json_schema.schema")
        _check_schema(schema)
    else:
        raise ApiError(400, f"response_format.type {kind!r}: use 'text', 'json_object' or 'json_schema'",
                       param="response_format.type")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ApiError(400, f"response_format.json_schema.schema: this schema cannot be enforced: {problem}",
                       param="response_format.json_schema.schema")
    return grammar


def _check_schema(schema: dict) -> None:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise ApiError(400, f"response_format.json_schema.schema{where} is not a valid JSON Schema: {e.message}",
                       param="response_format.json_schema.schema") from None


class Tokenizers:
    """llguidance's view of each served model's tokenizer, built once per model on first use (it reads
    the whole vocabulary)."""

    def __init__(self):
        self._made: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, m):
        with self._lock:
            if m.name not in self._made:
                import llguidance.hf

                n_vocab = int(m.model.get_output_embeddings().weight.shape[0])
                self._made[m.name] = llguidance.hf.from_tokenizer(m.tok, n_vocab=n_vocab,
                                                                  eos_token=sorted(m.eos_ids) or None)
            return self._made[m.name]


class Grammar:
    """One request's matcher: `mask(logits)` keeps only the tokens the grammar allows next, `accept(token)`
    advances it."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance
        import llguidance.numpy as lln

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.bitmask = lln.allocate_token_bitmask(1, tokenizer.vocab_size)
        self._lln = lln

    def mask(self, logits):
        """`logits` (1-D float32 torch tensor) with the forbidden tokens at -inf (in place)."""
        self._lln.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self._lln.apply_token_bitmask_inplace(logits.numpy(), self.bitmask)
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
