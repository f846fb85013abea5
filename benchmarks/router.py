"""Routing for `slmforge serve`'s model "auto": TF-IDF + logistic regression against bits-per-byte.

Measured on the demo run (runs/demo): the specialist (the latest dpo model, domain postgres) and the
generalist (the latest pretrain's generalist, domain general), each with router data built from the curated
splits exactly as an export folder carries it: domain/train.jsonl = the domain's train split (up to
--max-docs documents), domain/test.jsonl = its held-out test split. For each router kind (slmforge.serve.router):
  - fit time (TF-IDF: vectorizer + logistic regression on prompt-sized windows; bpb: none),
  - routing accuracy per domain on the held-out documents, on the full text and on its first 200
    characters (prompts are short), over all test documents of both domains (--test-docs caps each),
  - mean latency per routed prompt (ms), on this machine's CPU with --threads torch threads.
Prints a table and one JSON line. serve's default router kind (slmforge.serve.router.DEFAULT_KIND) is the one that
wins here on accuracy at 200 characters and on latency.

    .venv/bin/python benchmarks/router.py                 # ~5 minutes on 2 shared cores (bpb dominates)
    .venv/bin/python benchmarks/router.py --test-docs 20  # quick check

With --corpora, the TF-IDF router alone on many domains at once, which is harder than a specialist against
prose: each .jsonl(.gz) file of documents is one domain, its documents split 80/20 by a hash of their
position into router training and held-out sets, in pieces of up to 2000 characters (no models needed):

    .venv/bin/python benchmarks/router.py --corpora ../shared/data/{postgresql_docs,sqlite_docs,\
        debian_handbook,debian_reference,manpages,foldoc,bible_kjv,literature_pd}.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")


def _latest(stage: str, workdir: Path = DEMO) -> Path:
    from slmforge.artifacts import ArtifactStore

    return ArtifactStore(workdir).resolve(f"{stage}:latest").path  # a latest link, or an older text file


def _write_jsonl(path: Path, texts) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
            n += 1
    tmp.replace(path)
    return n


def export_like(model_dir: Path, out: Path, name: str, domain: str, curate_dir: Path, source: str,
                max_docs: int = 2000) -> Path:
    """An export-like folder: the model's files (symlinked), slmforge.json and domain/{train,test}.jsonl from
    the curated splits of `source`."""
    from slmforge.records import read_documents

    out.mkdir(parents=True, exist_ok=True)
    for f in MODEL_FILES:
        if (model_dir / f).is_file() and not (out / f).exists():
            (out / f).symlink_to((model_dir / f).resolve())
    for split, path in (("train", out / "domain" / "train.jsonl"), ("test", out / "domain" / "test.jsonl")):
        if not path.is_file():
            docs = read_documents(curate_dir / "data" / split, source, columns=["text"])
            _write_jsonl(path, (d["text"] for _, d in zip(range(max_docs), docs)))
    cfg = json.loads((model_dir / "config.json").read_text())
    meta = {"format": 1, "name": name, "domain": domain, "description": f"demo {name} ({domain})",
            "context": cfg.get("max_position_embeddings"), "chat": (model_dir / "chat_template.jinja").is_file(),
            "router": {"train": "domain/train.jsonl", "test": "domain/test.jsonl"}}
    (out / "slmforge.json").write_text(json.dumps(meta, indent=1))
    return out


def demo_exports(out: Path, workdir: Path = DEMO, max_docs: int = 2000) -> list[Path]:
    """[specialist (latest dpo, else pretrain specialist; domain postgres), generalist (domain general)]."""
    curate = _latest("curate", workdir)
    pre = _latest("pretrain", workdir)
    try:
        spec = _latest("dpo", workdir) / "dpo"
    except FileNotFoundError:
        spec = pre / "specialist"
    roles = json.loads((curate / "manifest.json").read_text())["metrics"]["roles"]
    domain = next(s for s, r in roles.items() if r == "domain")
    general = next(s for s, r in roles.items() if r == "general")
    return [export_like(spec, out / "demo-specialist", "demo-specialist", domain, curate, domain, max_docs),
            export_like(pre / "generalist", out / "demo-generalist", "demo-generalist", general, curate, general,
                        max_docs)]


def corpus_split(path: Path, max_docs: int, test_docs: int, piece: int = 2000) -> tuple[list[str], list[str]]:
    """Pieces of up to `piece` characters of the documents of one .jsonl(.gz) file (some corpora hold a few
    book-sized documents); every fifth document (by a hash of its position) goes, all its pieces, to the
    held-out side, so no held-out text was seen in training."""
    import gzip
    import hashlib

    train, test = [], []
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        for i, line in enumerate(f):
            text = json.loads(line).get("text", "")
            held = int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 5 == 0
            pieces = [p for k in range(0, len(text), piece) if (p := text[k: k + piece]).strip()]
            (test if held else train).extend(pieces)
            if len(train) >= max_docs and len(test) >= test_docs:
                break
    return train[:max_docs], test[:test_docs]


def multi_domain(paths: list[Path], max_docs: int, test_docs: int) -> dict:
    from slmforge.serve.router import PROMPT_CUT, TfidfRouter, routing_accuracy

    train, test = {}, {}
    for p in paths:
        name = p.name.split(".")[0]
        train[name], test[name] = corpus_split(p, max_docs, test_docs)
    router = TfidfRouter().fit(train)
    r = routing_accuracy(router, test)
    cut = f"first_{PROMPT_CUT}"
    print(f"\nTF-IDF routing over {len(paths)} domains (training pieces per domain up to {max_docs}, "
          f"held-out up to {test_docs}; fit {r['fit_s']:.1f} s)")
    head = f"{'domain':<18} {'held out':>8} {'acc full':>9} {'acc ' + cut:>16}"
    print(head)
    print("-" * len(head))
    for d, row in r["domains"].items():
        print(f"{d:<18} {row['n']:>8} {row['full']:>9.3f} {row[cut]:>16.3f}")
    print(f"{'all':<18} {r['n']:>8} {r['accuracy']:>9.3f} {r['accuracy_' + cut]:>16.3f}   "
          f"{r['ms_per_prompt']:.2f} ms/prompt")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(DEMO), help="a run's workdir with curate, pretrain (and dpo)")
    p.add_argument("--out", default="/tmp/slmforge-router-bench", help="where the export-like folders go")
    p.add_argument("--max-docs", type=int, default=2000, help="training documents per domain")
    p.add_argument("--test-docs", type=int, default=200, help="held-out documents per domain (at most)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpora", nargs="+", type=Path, help="TF-IDF only, one domain per .jsonl(.gz) file")
    args = p.parse_args()
    if args.corpora:
        r = multi_domain(args.corpora, args.max_docs, args.test_docs)
        print(json.dumps({"benchmark": "router_domains", "results": r,
                          "command": " ".join(shlex.quote(a) for a in sys.argv),
                          "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}))
        return

    import torch

    from slmforge.models.modeling import load_model
    from slmforge.serve.router import PROMPT_CUT, make_router, read_texts, routing_accuracy

    torch.set_num_threads(args.threads)
    folders = demo_exports(Path(args.out), Path(args.workdir), args.max_docs)
    metas = [json.loads((f / "slmforge.json").read_text()) for f in folders]
    train = {m["domain"]: read_texts(f / "domain" / "train.jsonl", args.max_docs) for f, m in zip(folders, metas)}
    test = {m["domain"]: read_texts(f / "domain" / "test.jsonl", args.test_docs) for f, m in zip(folders, metas)}
    models = {}
    for f, m in zip(folders, metas):
        model, tok = load_model(f)
        model.eval()
        models[m["domain"]] = (model, tok, m["context"])
    results = {}
    for kind in ("tfidf", "bpb"):
        t0 = time.perf_counter()
        router = make_router(kind, train=train, models=models)
        fit = time.perf_counter() - t0
        r = routing_accuracy(router, test)
        r["fit_s"] = round(fit, 2)
        results[kind] = r
        print(f"{kind}: done", file=sys.stderr, flush=True)

    cut = f"first_{PROMPT_CUT}"
    print(f"\nrouting on held-out documents ({', '.join(f'{d}: {len(t)}' for d, t in test.items())}), "
          f"{args.threads} threads")
    head = f"{'router':<8} {'domain':<10} {'acc full':>9} {'acc ' + cut:>16} {'ms/prompt':>10} {'fit s':>7}"
    print(head)
    print("-" * len(head))
    for kind, r in results.items():
        for d, row in r["domains"].items():
            print(f"{kind:<8} {d:<10} {row['full']:>9.3f} {row[cut]:>16.3f} {'':>10} {'':>7}")
        print(f"{kind:<8} {'all':<10} {r['accuracy']:>9.3f} {r['accuracy_' + cut]:>16.3f} "
              f"{r['ms_per_prompt']:>10.2f} {r['fit_s']:>7.2f}")
    print(json.dumps({"benchmark": "router", "results": results,
                      "command": " ".join(shlex.quote(a) for a in sys.argv),
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "torch_threads": args.threads}}))


if __name__ == "__main__":
    main()
