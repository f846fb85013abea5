"""The recipe's `serve:` section (a service, started by `slmforge serve`, never by `slmforge run`): which
models, where, and the limits that keep the server up under load. Imports neither torch nor FastAPI."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmforge.config import DEVICE_PATTERN, BatchSize, RecipePath, StageConfig, resolve_path, validate
from slmforge.serve.router import DEFAULT_KIND

# float32 is the default: exact, and int8 goes through torch.ao.quantization, which torch deprecates. Decode
# speed per weight type against transformers' generate, and int8's greedy agreement with float32: the README
# ("Decoding one sequence": benchmarks/serve_load.py; "CPU speed by weight type": benchmarks/gguf_verify.py).
DEFAULT_DTYPE = "float32"
DTYPES = ("float32", "bfloat16", "int8")


class RouterConfig(BaseModel):
    """How `model: "auto"` picks a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tfidf", "bpb"] = Field(DEFAULT_KIND, description="tfidf: character n-gram TF-IDF + logistic "
                                          "regression trained on each model's domain/train.jsonl; bpb: each "
                                          "model's bits per byte on the prompt (no training data needed)")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="below this routing probability the fallback "
                             "answers (when one is configured); 0 = always the top specialist")
    max_docs: int = Field(2000, ge=1, description="documents per domain read to train the TF-IDF router")
    eval_docs: int = Field(200, ge=0, description="held-out documents per domain scored at start (bpb: "
                           "at most 30, since it runs every model)")


class FallbackConfig(BaseModel):
    """Where low-confidence `auto` requests go: an OpenAI-compatible endpoint or a local model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(None, description="an OpenAI-compatible endpoint, e.g. http://host:8001/v1; "
                                 "unset = `model` is a catalog name or a model folder served locally")
    model: str = Field(..., min_length=1, description="the model name at the endpoint, or a catalog name/folder")
    api_key_env: str | None = Field(None, description="environment variable holding the endpoint's API key")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"fallback.base_url: {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v


class Config(StageConfig):
    """`slmforge serve`: which models, where, and the limits that keep the server up under load."""

    catalog: RecipePath | None = Field(None, description="catalog database (default: $SLMFORGE_CATALOG or "
                                "~/.slmforge/catalog.db)")
    models: list[str] = Field(default_factory=list, description="catalog names or model folders to serve "
                              "(default: every model in the catalog)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 = every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys_env: str = Field("SLMFORGE_API_KEYS", description="environment variable with comma-separated API "
                              "keys; when it is unset or empty, no key is required")
    max_concurrency: BatchSize = Field("auto", description="generations running at once; those of one model "
                                       "share its forward passes (continuous batching: slmforge.serve.batch); "
                                       "auto: 16 on the CPU, 64 on a GPU")
    max_queue: int = Field(64, ge=0, description="requests waiting for a generation slot; more get 429")
    queue_timeout_s: float = Field(120.0, gt=0, description="longest wait for a slot before a 429")
    router: RouterConfig = Field(default_factory=RouterConfig, description="routing for model \"auto\"")
    fallback: FallbackConfig | str | None = Field(None, description="low-confidence auto requests go here: "
                                                  "{base_url, model, api_key_env} or a catalog name/folder")
    fallback_timeout_s: float = Field(120.0, gt=0, description="timeout of a request to the fallback endpoint")
    dtype: Literal["float32", "bfloat16", "int8"] = Field(DEFAULT_DTYPE, description="weights in memory; int8 = "
                                                          "dynamic quantization of the Linear layers")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="where the local models run: auto (the GPU "
                        "where one is visible, else the CPU), cpu, cuda, cuda:N; int8 is CPU only")
    max_tokens: int = Field(128, ge=1, description="completion length when a request gives no max_tokens")
    max_body_kb: int = Field(1024, ge=1, description="largest request body; a larger one is refused with 413 "
                                                     "before it is parsed")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str], info) -> list[str]:
        """Folders (anything with '/' or starting with '.' or '~') resolve against the recipe's folder."""
        return [str(resolve_path(m, info)) if "/" in m or m.startswith((".", "~")) else m for m in v]

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.fallback, str) and not self.fallback.strip():
            raise ValueError("fallback: give a catalog name, a model folder or {base_url, model}")
        return self


def build_config(section: dict) -> Config:
    """The serve section (a plain mapping) validated; UserError naming every bad key (serve.router...)."""
    return validate(Config, section, "serve")
