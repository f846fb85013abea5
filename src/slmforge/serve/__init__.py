"""slmforge.serve: `slmforge serve`, an OpenAI-compatible HTTP server (FastAPI + uvicorn) for models.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events in the OpenAI wire format), GET /v1/router (routing report), GET /health, and a chat page at /.

- Models come from the catalog (names) or from folders (an export folder with slmforge.json, or any
  save_pretrained folder); they load through slmforge.models.modeling.load_model: safetensors only, no remote code.
- `model: "auto"` routes the prompt with slmforge.serve.router (TF-IDF + logistic regression over the served
  models' domains by default). Below `router.threshold` the request goes to the configured fallback (another
  OpenAI-compatible endpoint, streaming passed through, or a local model); with no fallback the top
  specialist answers. The answering model is named in `model`, in an extension field `slmforge` and in the
  `x-slmforge-model` header.
- Robustness: at most `max_concurrency` generations at once, at most `max_queue` requests waiting (beyond:
  429 with Retry-After); every field validated (OpenAI-style 400 bodies); prompts or max_tokens beyond the
  model's context rejected with code context_length_exceeded; optional API keys (401).
- Chat requests use the model's chat template. A model without one answers /v1/chat/completions with a 400
  naming the model (formatting a conversation plainly would give text the model never saw in training);
  /v1/completions still works for it.

- Requests to one model share its forward passes (continuous batching, batch); response_format json_object
  and json_schema are enforced by constrained decoding (structured); `slmforge: {knowledge: true}` or a
  model named `<generalist>+<specialist>` has the specialist write a passage the generalist answers with
  (knowledge).

Modules: config (the recipe's `serve:` section), models (catalog names and folders -> loaded models),
decode (one sequence's sampling, stops and pieces), batch (the per-model decode thread), structured
(grammars), knowledge (knowledge mode), schemas (OpenAI request bodies and error bodies), limits
(generation slots and the bridge to the event loop), server (the models, the router and the request
checks), app (the FastAPI routes); `slmforge serve` itself is a verb of slmforge.cli. Nothing is imported
here, so that `slmforge.serve.config` loads without torch or FastAPI.
"""
