"""Which models to serve and loading them: catalog names or folders -> `Served` (the model, its tokenizer,
context, stop tokens and router data)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.deploy.catalog import Catalog, read_meta
from slmforge.errors import UserError
from slmforge.models.chat import stop_token_ids


@dataclass
class Served:
    name: str
    domain: str
    path: Path
    model: Any
    tok: Any
    context: int
    chat: bool  # the tokenizer has a chat template: /v1/chat/completions can format messages for it
    eos_ids: set[int]
    params: int
    description: str = ""
    router_data: dict | None = None  # {"train": Path, "test": Path}
    meta: dict = field(default_factory=dict)
    chat_tuned: bool | None = None  # post-trained to chat: the catalog's `chat` (slmforge.json's); /v1/models says it
    endpoint: dict | None = None  # {base_url, model, api_key_env}: served there, `model` is None here


def resolve(spec: str, catalog: str | None) -> dict:
    """A catalog name or a folder -> {name, domain, path, description, router}. A bare name is looked up in
    the catalog first; a path (with '/', or starting with '.' or '~') is always a folder."""
    p = Path(spec).expanduser()
    if "/" not in spec and not spec.startswith((".", "~")):
        try:
            e = Catalog(catalog).get(spec)
        except UserError as err:
            if not p.is_dir():
                raise UserError(f"model {spec!r}: not a folder, and {err}") from None
        else:
            router = {k: (Path(e.path) / v) for k, v in (e.router or {}).items() if v}
            return {"name": e.name, "domain": e.domain or e.name, "path": Path(e.path),
                    "description": e.description or "", "router": router or None, "chat": e.chat,
                    "endpoint": e.endpoint, "params": e.params}
    if not p.is_dir():
        raise UserError(f"model {spec!r}: folder not found. Give an existing model folder or a catalog name")
    meta = read_meta(p)
    router = meta.get("router")
    if router:
        router = {k: (p / v) for k, v in router.items() if v}
    name = meta.get("name") or p.resolve().name
    chat = meta.get("chat")  # what `slmforge models add` would record: slmforge.json's, else the template's
    return {"name": name, "domain": meta.get("domain") or name, "path": p.resolve(),
            "description": meta.get("description", ""), "router": router,
            "chat": bool(chat) if chat is not None else None}


def catalog_names(catalog: str | None) -> list[str]:
    names = [e.name for e in Catalog(catalog).list()]
    if not names:
        raise UserError("no models to serve: the catalog is empty. Add one with `slmforge models add "
                        "<export folder>` or pass --model FOLDER")
    return names


def load_served(info: dict, dtype: str, device: str = "cpu") -> Served:
    """The model of `info` loaded; for a catalog endpoint, its tokenizer and config only (the endpoint
    generates; the tokenizer checks chat templates and context lengths, as for a local model)."""
    import torch

    from slmforge.models.modeling import load_model

    if info.get("endpoint"):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        model, tok = None, AutoTokenizer.from_pretrained(str(info["path"]), local_files_only=True)
        cfg = AutoConfig.from_pretrained(str(info["path"]), local_files_only=True)
        try:
            gen = GenerationConfig.from_pretrained(str(info["path"]), local_files_only=True)
        except OSError:
            gen = None
        params = int(info.get("params") or 0)
    else:
        model, tok = load_model(info["path"], dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                                device=device)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        if dtype == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        cfg, gen = model.config, getattr(model, "generation_config", None)
    context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
    eos = set()
    for src in (gen, cfg):
        ids = getattr(src, "eos_token_id", None) if src is not None else None
        if ids is not None:
            eos |= set(ids if isinstance(ids, list) else [ids])
    # EOS and chat.IM_END (slmforge.models.chat.stop_token_ids): an slmforge model's generation config has both already
    eos |= set(stop_token_ids(tok))
    template = bool(getattr(tok, "chat_template", None))
    tuned = info.get("chat")
    return Served(name=info["name"], domain=info["domain"], path=Path(info["path"]), model=model, tok=tok,
                  context=context, chat=template, eos_ids=eos, params=params,
                  description=info.get("description", ""), router_data=info.get("router"),
                  chat_tuned=template if tuned is None else bool(tuned), endpoint=info.get("endpoint"))

