"""catalog: a SQLite index (stdlib sqlite3) of exported specialists, so that people and the server can find
them by name: `slmforge models list|show|add|rm`.

A row holds what a user needs to choose a model without opening it: name, domain, description,
parameters, context, whether it has a chat template, tokenizer, the absolute folder, lineage (recipe
and stage keys), benchmark scores, the GGUF file, the router's domain samples and when it was made.
Most of it comes from the `slmforge.json` that `slmforge export` writes; a plain Hugging Face folder
can be added too, with `--domain`.

Adding validates the folder without loading its weights (a 7B model's are 28 GB in float32):
the config parses and names a causal LM that transformers knows, no `auto_map` (remote code is never
run), weights are safetensors only, every tensor the architecture expects is in the safetensors
headers with the right shape (the model is built on the meta device, which allocates nothing), the
tokenizer loads, and a model card (README.md with YAML front matter) is there.

Concurrency: the database runs in WAL mode, so readers never block and never see a half-done write;
each write is one `BEGIN IMMEDIATE` transaction (atomic: all of it or none), and writers wait for one
another (busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from slmforge.common import NAME_RE
from slmforge.errors import UserError

RESERVED = frozenset({"auto"})  # `model: "auto"` asks the server's router
SCHEMA_VERSION = 1
_COLUMNS = ("name", "domain", "description", "params", "context", "chat", "tokenizer", "path", "lineage", "scores",
            "gguf", "router", "created", "endpoint")
_JSON = ("tokenizer", "lineage", "scores", "router", "endpoint")


def default_path() -> Path:
    """$SLMFORGE_CATALOG, else ~/.slmforge/catalog.db."""
    env = os.environ.get("SLMFORGE_CATALOG")
    return Path(env).expanduser() if env else Path.home() / ".slmforge" / "catalog.db"


@dataclass(frozen=True)
class Entry:
    name: str
    domain: str
    description: str
    params: int
    context: int
    chat: bool
    tokenizer: dict
    path: Path
    lineage: dict
    scores: dict
    gguf: str | None
    router: dict | None
    created: str
    # where the model is served instead of loading the folder's weights (vLLM, `slmforge llama-server`):
    # {base_url, model, api_key_env}; the folder still gives the tokenizer, the card and the router's data
    endpoint: dict | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED:
        raise UserError(f"{what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a "
                        f"letter or digit (no '/', no spaces){'; ' + repr(name) + ' is reserved' if name in RESERVED else ''}")
    return name


class Catalog:
    """The index at `path` (default: default_path()). The file is created on the first write."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser().resolve() if path is not None else default_path()

    # -- reading -------------------------------------------------------------------------------------
    def list(self) -> list[Entry]:
        if not self.path.is_file():
            return []
        with closing(self._connect(readonly=True)) as db:
            rows = db.execute(f"SELECT {_select(db)} FROM models ORDER BY name").fetchall()
        return [_entry(r) for r in rows]

    def get(self, name: str) -> Entry:
        if self.path.is_file():
            with closing(self._connect(readonly=True)) as db:
                row = db.execute(f"SELECT {_select(db)} FROM models WHERE name = ?", (name,)).fetchone()
            if row:
                return _entry(row)
        names = [e.name for e in self.list()]
        raise UserError(f"catalog {self.path}: no model called {name!r}; it has "
                        f"{', '.join(names) if names else 'no models yet (add one with `slmforge models add FOLDER`)'}")

    # -- writing -------------------------------------------------------------------------------------
    def add(self, folder: str | Path, name: str | None = None, domain: str | None = None,
            description: str | None = None, replace: bool = False, endpoint: dict | None = None) -> Entry:
        """Validate `folder` (see the module docstring) and index it under `name`; with `endpoint`
        ({base_url, model, api_key_env}) the server forwards its requests there instead of loading it."""
        if name is not None:
            check_name(name, "model name")  # before the slower folder checks
        if endpoint is not None:
            url = endpoint.get("base_url") or ""
            if not url.startswith(("http://", "https://")):
                raise UserError(f"--endpoint {url!r}: give the OpenAI-compatible base URL, e.g. "
                                "http://127.0.0.1:8001/v1")
            endpoint = {"base_url": url.rstrip("/"), "model": endpoint.get("model"),
                        "api_key_env": endpoint.get("api_key_env")}
        folder = Path(folder).expanduser().resolve()
        meta = validate_folder(folder)
        name = check_name(name if name is not None else meta.get("name") or folder.name.lower(), "model name")
        domain = domain or meta.get("domain")
        if not domain:
            raise UserError(f"{folder}: no slmforge.json says the model's domain; pass --domain (e.g. --domain law)")
        entry = Entry(
            name=name, domain=str(domain), description=description or meta.get("description") or "",
            params=int(meta["params"]), context=int(meta["context"]), chat=bool(meta["chat"]),
            tokenizer=meta.get("tokenizer") or {}, path=folder, lineage=meta.get("lineage") or {},
            scores=meta.get("scores") or {}, gguf=meta.get("gguf"), router=meta.get("router"),
            created=meta.get("created") or _now(),
            endpoint={**endpoint, "model": endpoint["model"] or name} if endpoint else None)
        row = _row(entry)
        with self._write() as db:
            old = db.execute("SELECT path FROM models WHERE name = ?", (name,)).fetchone()
            if old and not replace:
                raise UserError(f"catalog {self.path}: {name!r} is already there ({old[0]}); pass --replace to "
                                f"point it at {folder}, or choose another --name")
            db.execute(f"INSERT OR REPLACE INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(row))})",
                       row)
        return entry

    def remove(self, name: str) -> Entry:
        """Drop `name` from the index; the model folder is left alone."""
        entry = self.get(name)
        with self._write() as db:
            db.execute("DELETE FROM models WHERE name = ?", (name,))
        return entry

    # -- sqlite --------------------------------------------------------------------------------------
    def _connect(self, readonly: bool = False) -> sqlite3.Connection:
        try:
            if readonly:
                db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=30)
            else:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                    "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, domain TEXT NOT NULL, "
                    "description TEXT NOT NULL, params INTEGER NOT NULL, context INTEGER NOT NULL, "
                    "chat INTEGER NOT NULL, tokenizer TEXT NOT NULL, path TEXT NOT NULL, lineage TEXT NOT NULL, "
                    "scores TEXT NOT NULL, gguf TEXT, router TEXT, created TEXT NOT NULL, endpoint TEXT);")
                if "endpoint" not in _columns(db):  # a catalog from before endpoints: the column is added
                    db.execute("ALTER TABLE models ADD COLUMN endpoint TEXT")
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(f"catalog {self.path}: not a readable slmforge catalog ({e}); point --catalog "
                            f"(or $SLMFORGE_CATALOG) at another file") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise UserError(f"catalog {self.path}: schema {version and version[0]} is not {SCHEMA_VERSION}, the one "
                            f"this slmforge writes; use a new --catalog file and add the models again")
        return db

    @contextmanager
    def _write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _columns(db: sqlite3.Connection) -> set[str]:
    return {r[1] for r in db.execute("PRAGMA table_info(models)")}


def _select(db: sqlite3.Connection) -> str:
    """The SELECT list of _COLUMNS; NULL for a column an older catalog file does not have yet."""
    have = _columns(db)
    return ", ".join(c if c in have else f"NULL AS {c}" for c in _COLUMNS)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(e: Entry) -> tuple:
    d = e.as_dict()
    return tuple(json.dumps(d[c]) if c in _JSON else (int(d[c]) if c == "chat" else d[c]) for c in _COLUMNS)


def _entry(row: tuple) -> Entry:
    d = dict(zip(_COLUMNS, row))
    for c in _JSON:
        d[c] = json.loads(d[c]) if d[c] is not None else None
    d["chat"], d["path"] = bool(d["chat"]), Path(d["path"])
    return Entry(**d)


def read_card(folder: Path) -> dict:
    """The YAML front matter of folder/README.md (the Hugging Face model card)."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        raise UserError(f"{folder}: no model card (README.md); `slmforge export` writes one, or write a README.md "
                        "that starts with YAML front matter between '---' lines")
    text = card.read_text(encoding="utf-8")
    parts = text.split("---", 2)
    if not text.startswith("---") or len(parts) < 3:
        raise UserError(f"{card}: the model card has no YAML front matter; start it with '---', the metadata "
                        "(e.g. library_name: transformers), and '---'")
    try:
        front = yaml.safe_load(parts[1])
    except yaml.YAMLError as e:
        raise UserError(f"{card}: the front matter is not valid YAML: {e}") from None
    if not isinstance(front, dict):
        raise UserError(f"{card}: the front matter must be a mapping of keys")
    return front


def read_meta(folder: Path) -> dict:
    """folder/slmforge.json (what export records about a model), or {} for a plain HF folder."""
    sj = folder / "slmforge.json"
    if not sj.is_file():
        return {}
    try:
        return json.loads(sj.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{sj}: not valid JSON ({e}); export the model again") from None


def validate_folder(folder: Path) -> dict:
    """Check that `folder` is a loadable, safe causal-LM folder with a card (module docstring); return
    what the catalog records: slmforge.json's fields, with params, context and chat filled in."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give an exported model folder (slmforge export writes "
                        "<workdir>/export/<key>/<name>/)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    if "auto_map" in raw:
        raise UserError(f"{cfg_file}: has auto_map (custom code); slmforge never runs remote code, so it cannot "
                        "serve this model")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        raise UserError(f"{folder}: no .safetensors weights{' (found ' + ', '.join(pickles) + ')' if pickles else ''}; "
                        "slmforge loads only safetensors. Re-save with model.save_pretrained(folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{cfg_file}: transformers cannot build a causal LM from it: {e}") from None
    found: dict[str, tuple] = {}
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{w}: not a readable safetensors file ({e}); export the model again") from None
    tied = {k for k in ("lm_head.weight",) if getattr(config, "tie_word_embeddings", False)}
    problems = []
    for k, p in model.state_dict().items():
        if k in found:
            if tuple(p.shape) != found[k]:
                problems.append(f"{k}: shape {found[k]} in the weights, {tuple(p.shape)} in config.json")
        elif k not in tied:
            problems.append(f"{k}: missing from the weights")
    if problems:
        raise UserError(f"{folder}: the weights do not match config.json ({len(problems)} problem(s)): "
                        + "; ".join(problems[:5]))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{folder}: the tokenizer does not load ({e}); save it with tokenizer.save_pretrained") from None
    read_card(folder)
    meta = read_meta(folder)
    meta.setdefault("params", sum(p.numel() for p in model.parameters()))
    meta.setdefault("context", int(getattr(config, "max_position_embeddings", 0) or 0))
    meta.setdefault("chat", bool(getattr(tok, "chat_template", None)))
    meta.setdefault("tokenizer", {"type": type(tok).__name__, "vocab_size": len(tok)})
    return meta


# -- what `slmforge models ...` prints -----------------------------------------------------------------

def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


HEADLINE = ("mcq/acc", "completion/acc_mutual_info", "qa/exact_match", "summarization/rougeL")


def _headline(e: Entry) -> str:
    """The bench stage's headline scores and the bits per byte on the model's own domain."""
    keys = [k for k in HEADLINE if k in e.scores] + [k for k in (f"bpb/{e.domain}",) if k in e.scores]
    return ", ".join(f"{k} {e.scores[k]:.3f}" for k in keys if isinstance(e.scores[k], (int, float)))


def _print_table(entries: list[Entry], catalog: Catalog) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # no wrapped names in pipes
    if not entries:
        out.print(f"catalog {catalog.path}: no models yet. Add one: slmforge models add FOLDER")
        return
    t = Table(title=f"catalog {catalog.path}")
    for col in ("name", "domain", "params", "context", "chat", "gguf", "scores", "path"):
        t.add_column(col)
    for e in entries:
        path = str(e.path) + ("" if e.path.is_dir() else "  [red](missing)[/red]") + (
            f"  (served by {e.endpoint['base_url']})" if e.endpoint else "")
        t.add_row(e.name, e.domain, _fmt_params(e.params), str(e.context), "yes" if e.chat else "no",
                  "yes" if e.gguf else "no", _headline(e), path)
    out.print(t)


def print_catalog(catalog: Catalog, as_json: bool = False) -> None:
    """`slmforge models list`: every entry as a table, or as JSON."""
    entries = catalog.list()
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
    else:
        _print_table(entries, catalog)


def print_entry(catalog: Catalog, name: str) -> None:
    """`slmforge models show NAME`: the entry as JSON, and a warning when its folder is gone."""
    e = catalog.get(name)
    print(json.dumps(e.as_dict(), indent=2))
    if not e.path.is_dir():
        print(f"warning: {e.path} no longer exists; `slmforge models rm {e.name}`", file=sys.stderr)


def add_entry(catalog: Catalog, folder: str | Path, **kw) -> Entry:
    """`slmforge models add FOLDER`: Catalog.add (its keywords), then one line on stderr saying what was added."""
    e = catalog.add(folder, **kw)
    via = f", served by {e.endpoint['base_url']} as {e.endpoint['model']!r}" if e.endpoint else ""
    print(f"added {e.name} ({e.domain}, {_fmt_params(e.params)}) -> {e.path}{via} to {catalog.path}", file=sys.stderr)
    return e


def remove_entry(catalog: Catalog, name: str) -> Entry:
    """`slmforge models rm NAME`: Catalog.remove, then one line on stderr (the folder is kept)."""
    e = catalog.remove(name)
    print(f"removed {e.name} from {catalog.path} (folder {e.path} kept)", file=sys.stderr)
    return e
