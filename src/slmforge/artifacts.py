"""ArtifactStore: content-hash keyed run directories, atomic payloads, manifests written last.

Layout: `<workdir>/<stage>/<key>/` holds a stage's payload and `manifest.json`.
- key = hash(stage, config (minus speed-only fields), input artifacts' keys, external inputs'
  fingerprints, FORMAT_VERSION). Same key = same result: the stage is skipped.
- The payload is built in `<key>.partial/` (stages that checkpoint resume from it), renamed into
  place, and `manifest.json` is written last, atomically. A directory without a manifest is
  incomplete: it is resumed or redone, never read as done.
- `<workdir>/<stage>/latest` is a relative symlink to the last completed run's `<key>/` folder
  ("curate:latest"; `slmforge path curate RECIPE` prints it). Workdirs made before it was a link hold
  the key in a text file there, and a copy made by following links holds a real folder: both still
  resolve.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.console import info, stage_output
from slmforge.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"  # <stage>/latest: a symlink to the last completed <key>/
_VERSIONED = ("slmforge", "datatrove", "tokenizers", "transformers", "torch", "pyarrow", "pydantic")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WHOLE_FILE_MAX = 16 << 20  # files up to this size are hashed whole in a fingerprint


def _safetensors_header(path: Path) -> str:
    """A hash of a safetensors file's header (8-byte little-endian length, then JSON: names, shapes,
    dtypes and offsets of every tensor)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return hashlib.blake2b(f.read(min(n, 100 << 20)), digest_size=16).hexdigest()


def _file_print(path: Path) -> str:
    st = path.stat()
    if st.st_size <= WHOLE_FILE_MAX:
        return hash_file(path)  # configs, tokenizers, templates, seeds, small models: exact
    head = _safetensors_header(path) if path.suffix == ".safetensors" else ""
    # large weights: reading 270 MB to 1.7 GB on every `slmforge status` is too slow, so size, mtime and
    # the header stand in (a copy without `cp -p` or a `touch` re-runs what reads it: safe, not stale)
    return f"{st.st_size}:{st.st_mtime_ns}:{head}"


def fingerprint(path: str | Path | None) -> str | dict | None:
    """A local input's identity for a cache key, so that editing it re-runs what reads it: a file's print
    (the whole file's hash up to WHOLE_FILE_MAX, else size, mtime and a safetensors header), or
    {name: print} over a folder's top-level files (what from_pretrained reads; hidden files and
    subfolders such as snapshots/ are left out); "missing" when it is not there."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_file():
        return _file_print(p)
    return {f.name: _file_print(f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "mem_gb": mem_gb, "system": platform.system()}


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def ref(self) -> str:
        return f"{self.stage}:{self.key}"


class ArtifactStore:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.last_built: tuple[str, str] | None = None  # (stage, key) of the last build, not cache hit

    # ---- naming -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def run_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f"{key}.partial"

    @staticmethod
    def key(stage: str, config: dict, input_keys: dict[str, str], external: dict | None = None) -> str:
        payload = {
            "stage": stage,
            "config": config,
            "inputs": dict(sorted(input_keys.items())),
            "external": external or {},
            "format": FORMAT_VERSION,
        }
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]

    # ---- reading ------------------------------------------------------------------------------
    def state(self, stage: str, key: str) -> str:
        """'done' (manifest present), 'incomplete' (work started, no manifest) or 'not run'."""
        final = self.run_dir(stage, key)
        if (final / MANIFEST).is_file():
            return "done"
        if final.exists() or self.partial_dir(stage, key).exists():
            return "incomplete"
        return "not run"

    def load(self, stage: str, key: str) -> Artifact:
        final = self.run_dir(stage, key)
        try:
            manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{stage}:{key} is not complete (no {final / MANIFEST}); run the stage again") from None
        return Artifact(stage, key, final, manifest)

    def latest_key(self, stage: str) -> str | None:
        """The key that `<stage>/latest` names, or None if the stage never completed here. `latest` is a
        symlink to `<key>/`; a text file holding the key (workdirs made before the link) and a real folder
        (a copy of the workdir that followed the link: its manifest names the key) are read too."""
        latest = self.stage_dir(stage) / LATEST
        if latest.is_symlink():
            return Path(os.readlink(latest)).name
        if latest.is_file():
            return latest.read_text(encoding="utf-8").strip() or None
        if latest.is_dir():
            try:
                return json.loads((latest / MANIFEST).read_text(encoding="utf-8"))["key"]
            except (OSError, ValueError, KeyError):
                return None
        return None

    def resolve(self, ref: str) -> Artifact:
        """'stage:latest' or 'stage:KEY' -> the completed Artifact."""
        stage, _, key = ref.partition(":")
        key = key or LATEST
        if key == LATEST:
            key = self.latest_key(stage)
            if key is None:
                raise UserError(
                    f"{ref}: no completed {stage} run in {self.workdir}; run `slmforge {stage} RECIPE` "
                    f"or `slmforge run RECIPE --until {stage}` first"
                )
        return self.load(stage, key)

    # ---- building -----------------------------------------------------------------------------
    def build(
        self,
        stage: str,
        cfg,
        inputs: dict[str, Artifact],
        builder: Callable[[Path], dict],
        external: dict | None = None,
        resumable: bool = False,
        force: bool = False,
        distributed: bool = False,
    ) -> Artifact:
        """Return the cached artifact for this (config, inputs), or build it.

        `builder(out_dir)` writes the payload into `out_dir` and returns the manifest's metrics.
        With `resumable`, a `.partial` directory left by a killed run is handed back to the builder
        (which resumes from its checkpoints); otherwise it is wiped first.
        Under torchrun/accelerate (several processes) the main process prepares and finalises the
        directory; a `distributed` builder runs on every rank, any other only on the main one.
        """
        from slmforge import dist

        self._check_writable(stage)
        if dist.world_size() > 1:
            return self._build_ranks(stage, cfg, inputs, builder, external, resumable, force, distributed)
        return self._build_one(stage, cfg, inputs, builder, external, resumable, force)

    def _check_writable(self, stage: str) -> None:
        """The stage's folder exists and takes a file, or a UserError that names the path and the reason
        (a workdir that is a file, lies under one, is read-only or on a filesystem such as /proc)."""
        folder = self.stage_dir(stage)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"workdir {self.workdir}: cannot write {e.filename or folder} ({e.strerror or e}); set "
                            "`workdir:` in the recipe, or --set workdir=DIR, to a folder you can write") from None

    def log_path(self, stage: str, rank: int = 0) -> Path:
        """Where other libraries' output goes while `stage` builds (console.stage_output), appended."""
        return self.workdir / "logs" / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")

    def _build_one(self, stage, cfg, inputs, builder, external, resumable, force) -> Artifact:
        key = self.key(stage, cfg.key_dict(), {k: a.key for k, a in inputs.items()}, external)
        final = self.run_dir(stage, key)
        if not force and (final / MANIFEST).is_file():
            art = self.load(stage, key)
            info(f"[green]✓[/] {stage}: cached ({key}, made in {art.manifest.get('wall_time_s', 0):.1f}s)")
            self._set_latest(stage, key)
            return art

        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        lock_path = self.stage_dir(stage) / f".{key}.lock"
        with open(lock_path, "a") as lock:
            # A POSIX record lock (lockf), not flock: it belongs to this process alone and is not inherited
            # by the processes a stage forks (curate's workers, a multiprocessing manager), so when this
            # process dies, even by SIGKILL, the OS releases it at once although an orphaned child lives on.
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise UserError(
                    f"{stage}: another slmforge process is building {final}; wait for it to finish"
                ) from None
            return self._build_locked(stage, key, cfg, inputs, builder, external, resumable, force)

    def _build_ranks(self, stage, cfg, inputs, builder, external, resumable, force, distributed) -> Artifact:
        from slmforge import dist

        key = self.key(stage, cfg.key_dict(), {k: a.key for k, a in inputs.items()}, external)
        done = (self.run_dir(stage, key) / MANIFEST).is_file() and not force
        if not distributed or done:
            if dist.is_main():
                self._build_one(stage, cfg, inputs, builder, external, resumable, force)
            dist.barrier()
            return self.load(stage, key)
        partial = self.partial_dir(stage, key)
        if dist.is_main():
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            if partial.exists() and not resumable:
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        started = time.time()
        with stage_output(self.log_path(stage, dist.rank())):
            metrics = builder(partial) or {}
        dist.barrier()
        if dist.is_main():
            self._finish(stage, key, cfg, inputs, external, partial, metrics, started, resumed=False)
        dist.barrier()
        return self.load(stage, key)

    def _build_locked(self, stage, key, cfg, inputs, builder, external, resumable, force) -> Artifact:
        final, partial = self.run_dir(stage, key), self.partial_dir(stage, key)
        if final.exists():  # renamed into place but no manifest (killed in between), or --force
            if partial.exists() or force:
                shutil.rmtree(final)
            else:
                os.rename(final, partial)
        if partial.exists() and not (resumable and not force):
            shutil.rmtree(partial)
        resumed = partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        info(f"[bold]▶ {stage}[/] ({key}){' resuming' if resumed else ''}")
        started = time.time()
        try:
            with stage_output(self.log_path(stage)):
                metrics = builder(partial) or {}
        except UserError:
            if not resumable:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        return self._finish(stage, key, cfg, inputs, external, partial, metrics, started, resumed)

    def _finish(self, stage, key, cfg, inputs, external, partial, metrics, started, resumed) -> Artifact:
        final = self.run_dir(stage, key)
        wall = time.time() - started
        outputs = {
            str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
        }
        os.rename(partial, final)
        manifest = {
            "stage": stage,
            "key": key,
            "format": FORMAT_VERSION,
            "config": cfg.model_dump(mode="json"),
            "inputs": {k: a.key for k, a in inputs.items()},
            "external": external or {},
            "outputs": outputs,
            "metrics": metrics,
            "versions": versions(),
            "hardware": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_time_s": round(wall, 3),
            "resumed": resumed,
        }
        write_json_atomic(final / MANIFEST, manifest)  # last: its presence means the stage is done
        self._set_latest(stage, key)
        self.last_built = (stage, key)
        info(f"[green]✓[/] {stage}: done in {wall:.1f}s → {final}")
        return Artifact(stage, key, final, manifest)

    def _set_latest(self, stage: str, key: str) -> None:
        """Point `<stage>/latest` at `<key>/`: a relative symlink made under a temp name, then renamed over
        the old one (atomic: a reader sees the old link or the new one). On a filesystem without symlinks
        the key is written as text, which `latest_key` reads too."""
        latest = self.stage_dir(stage) / LATEST
        tmp = latest.with_name(f".{LATEST}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(key, tmp, target_is_directory=True)
        except OSError:
            tmp.write_text(key + "\n", encoding="utf-8")
        if latest.is_dir() and not latest.is_symlink():  # a copy of a run, made by following the link
            shutil.rmtree(latest)
        os.replace(tmp, latest)
