"""evaluate: the domain benchmarks through lm-evaluation-harness, bits-per-byte and perplexity of every
model on each source's test split, greedy samples, and a self-contained HTML report (loss curves
drawn as pictures).

The benchmark suite (the bench stage's task folders) runs through lm-eval's Python API on each model
(offline: tasks from local files, models and tokenizers from local folders), next to chance and the
trivial-rule baselines the bench stage measured.

Bits per byte = (summed negative log-likelihood of the text's tokens, in bits) / (UTF-8 bytes of the
text). Unlike perplexity it does not depend on the tokenizer, so a specialist with a domain tokenizer
and a generalist with a general one are compared fairly. Each document is scored as BOS + tokens;
the stream is cut into windows of the model's context, and document-boundary tokens (BOS, EOS) are
not scored.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from pydantic import Field

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import StageConfig
from slmforge.console import info
from slmforge.errors import UserError
from slmforge.records import read_documents

NAME = "evaluate"
INPUTS = ("curate", "pretrain", "bench")


class Config(StageConfig):
    """Which text to score and how many samples to show."""

    models: dict[str, str] = Field(
        default_factory=dict, description="extra models to compare: name -> local HF folder (offline)")
    max_bytes: int = Field(400_000, ge=1000, description="test-split bytes scored per source (first documents by id)")
    batch_size: int = Field(8, ge=1)
    samples: int = Field(3, ge=0, description="greedy samples per source")
    sample_tokens: int = Field(40, ge=1, description="tokens generated per sample")
    prompt_chars: int = Field(160, ge=10, description="characters of a test document used as the prompt")
    bench_limit: int | None = Field(None, ge=1, description="benchmark items per task at most (None: all)")


def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {s: store.resolve(f"{s}:latest") for s in INPUTS}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, inputs, out), force=force)


def bits_per_byte(model, tokenizer, texts: list[str], context: int, batch_size: int = 8) -> dict:
    """Summed NLL over the texts' tokens in bits / their UTF-8 bytes, and token-level perplexity."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += [bos, *e.ids, eos]
    arr = np.asarray(stream, dtype=np.int64)
    n_win = math.ceil((len(arr) - 1) / context)
    pad = n_win * context + 1 - len(arr)
    arr = np.concatenate([arr, np.full(pad, -100, dtype=np.int64)])
    x = torch.as_tensor(arr[:-1].reshape(n_win, context)).clamp(min=0)
    y = torch.as_tensor(arr[1:].reshape(n_win, context))
    y = torch.where((y == bos) | (y == eos), torch.full_like(y, -100), y)
    nll, n_tok = 0.0, int((y != -100).sum())
    model.eval()
    with torch.no_grad():
        for i in range(0, n_win, batch_size):
            logits = model(input_ids=x[i:i + batch_size].to(model.device)).logits.float()
            nll += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten().to(model.device),
                                   ignore_index=-100, reduction="sum").item()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bpb": round(nll / math.log(2) / n_bytes, 4), "ppl": round(math.exp(nll / max(n_tok, 1)), 3),
            "tokens": n_tok, "bytes": n_bytes}


def run_benchmarks(model, tokenizer, tasks_dir: Path, tasks: list[str], batch_size: int, limit: int | None) -> dict:
    """{task: {metric: value}} from lm-eval's simple_evaluate on an in-memory HF model."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)),
                          limit=limit, log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    return {t: {k.split(",")[0]: round(v, 4) for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for t, r in out["results"].items()}


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _prompt(text: str, chars: int) -> str:
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _texts(curate: Artifact, source: str, max_bytes: int) -> list[str]:
    out, used = [], 0
    for row in read_documents(curate.path / "data" / "test", source, columns=["text"]):
        out.append(row["text"])
        used += len(row["text"].encode("utf-8"))
        if used >= max_bytes:
            break
    return out


def _build(cfg: Config, inputs: dict[str, Artifact], out: Path) -> dict:
    from slmforge.modeling import load_model

    curate, pretrain, bench = inputs["curate"], inputs["pretrain"], inputs["bench"]
    tasks = bench.manifest["metrics"]["tasks"]
    roles = curate.manifest["metrics"]["roles"]
    models = {name: pretrain.path / name for name in pretrain.manifest["metrics"]["models"]}
    models.update({k: Path(v) for k, v in cfg.models.items()})
    texts = {s: _texts(curate, s, cfg.max_bytes) for s in roles}
    empty = [s for s, t in texts.items() if not t]
    if empty:
        raise UserError(f"evaluate: the test split of {', '.join(empty)} is empty; raise curate.test_fraction")
    scores: dict[str, dict] = {}
    benchmarks: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for name, path in models.items():
        model, tok = load_model(path)
        context = min(model.config.max_position_embeddings, 1024)
        scores[name] = {}
        for source, t in texts.items():
            info(f"  evaluate · {name} on {source} test ({sum(len(x) for x in t) / 1e3:.0f} kB)")
            scores[name][source] = bits_per_byte(model, tok, t, context, cfg.batch_size)
        info(f"  evaluate · {name} on the benchmark suite ({', '.join(tasks)})")
        benchmarks[name] = run_benchmarks(model, tok, bench.path / "tasks", tasks, cfg.batch_size, cfg.bench_limit)
        for source, t in texts.items():
            for doc in t[: cfg.samples]:
                prompt = _prompt(doc, cfg.prompt_chars)
                samples.setdefault(f"{source}: {prompt}", []).append(
                    {"model": name, "completion": greedy(model, tok, prompt, cfg.sample_tokens)})
    domain = [s for s, r in roles.items() if r == "domain"]
    general = [s for s, r in roles.items() if r == "general"]
    margins = {}
    if "specialist" in scores and "generalist" in scores:
        for s in domain + general:
            sp, ge = scores["specialist"][s]["bpb"], scores["generalist"][s]["bpb"]
            margins[s] = {"specialist_bpb": sp, "generalist_bpb": ge, "relative": round(1 - sp / ge, 4)}
    metrics = {"scores": scores, "margins": margins, "domain_sources": domain, "general_sources": general,
               "benchmarks": benchmarks, "baselines": bench.manifest["metrics"]["trivial_baselines"],
               "bench_sizes": bench.manifest["metrics"]["sizes"], "samples": samples}
    (out / "results.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    report = render_report(pretrain, metrics)
    (out / "report.html").write_text(report, encoding="utf-8")
    (out / "report.md").write_text(render_markdown(pretrain, metrics), encoding="utf-8")
    print_results(metrics, out.with_name(out.name.removesuffix(".partial")) / "report.html")
    return {k: v for k, v in metrics.items() if k != "samples"} | {"report": "report.html"}


# ---- presentation ------------------------------------------------------------------------------------
def print_results(m: dict, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    stdout = Console(highlight=False)
    t = Table(title="bits per byte on each test split (lower is better)")
    t.add_column("model")
    sources = list(next(iter(m["scores"].values())))
    for s in sources:
        t.add_column(f"{s} ({'domain' if s in m['domain_sources'] else 'general'})", justify="right")
    for name, per in m["scores"].items():
        t.add_row(name, *[f"{per[s]['bpb']:.3f}" for s in sources])
    stdout.print(t)
    for s, g in m["margins"].items():
        better = "better" if g["relative"] > 0 else "worse"
        stdout.print(f"  {s}: the specialist is {abs(g['relative']):.1%} {better} than the generalist "
                     f"({g['specialist_bpb']:.3f} vs {g['generalist_bpb']:.3f} bits/byte)")
    if m.get("benchmarks"):
        b = Table(title="domain benchmarks (lm-evaluation-harness)")
        b.add_column("task · metric")
        for name in m["benchmarks"]:
            b.add_column(name, justify="right")
        b.add_column("chance / trivial rules", justify="right")
        for task, metric in _bench_rows(m):
            ref = _reference(m, task, metric)
            b.add_row(f"{task} · {metric}", *[f"{m['benchmarks'][n].get(task, {}).get(metric, float('nan')):.3f}"
                                              for n in m["benchmarks"]], ref)
        stdout.print(b)
    for prompt, outs in list(m["samples"].items())[:4]:
        stdout.print(f"\n[bold]{prompt[:100]}[/]")
        for o in outs:
            stdout.print(f"  [cyan]{o['model']}[/]: {o['completion'][:160]!r}")
    stdout.print(f"\nreport: {report}")


def _reference(m: dict, task: str, metric: str) -> str:
    """'chance / best trivial rule' for an accuracy metric of a choice task, else ''."""
    base = m["baselines"].get(task.split("_", 1)[-1], {})
    if not base or not metric.startswith("acc"):
        return ""
    return f"{base['chance']:.2f} / {max(v for k, v in base.items() if k not in ('items', 'chance')):.2f}"


def _bench_rows(m: dict) -> list[tuple[str, str]]:
    first = next(iter(m["benchmarks"].values()))
    return [(t, k) for t in sorted(first) for k in sorted(first[t]) if k not in ("alias", "samples", "sample_len")]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def loss_curves(pretrain: Artifact) -> list[tuple[str, str]]:
    """(title, PNG data URI) for the training loss and the per-source validation losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in pretrain.manifest["metrics"]["models"]:
        rows = [json.loads(x) for x in (pretrain.path / name / "train_log.jsonl").read_text().splitlines()]
        ax.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], label=name, lw=1)
    ax.set(xlabel="training tokens (M)", ylabel="train loss (nats/token)", title="Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    pictures.append(("Training loss", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in pretrain.manifest["metrics"]["models"]:
        rows = [json.loads(x) for x in (pretrain.path / name / "val_log.jsonl").read_text().splitlines()]
        for source in [k for k in (rows[0] if rows else {}) if k not in ("step", "tokens")]:
            ax.plot([r["tokens"] / 1e6 for r in rows], [r[source] for r in rows], marker=".", label=f"{name} · {source}")
    ax.set(xlabel="training tokens (M)", ylabel="val loss (nats/token)", title="Validation loss per source")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pictures.append(("Validation loss per source", _png(fig)))
    plt.close(fig)
    return pictures


def score_charts(m: dict) -> list[tuple[str, str]]:
    """Bar charts: bits per byte per source, and benchmark accuracy per task with chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = []
    names = list(m["scores"])
    sources = list(next(iter(m["scores"].values())))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(sources))], [m["scores"][n][s]["bpb"] for s in sources], width, label=n)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(sources))], sources)
    ax.set(ylabel="bits per byte (lower is better)", title="Test-split bits per byte")
    ax.legend()
    pictures.append(("Bits per byte", _png(fig)))
    plt.close(fig)
    if m.get("benchmarks"):
        rows = [(t, k) for t, k in _bench_rows(m) if k in ("acc", "acc_norm", "exact_match", "rougeL")]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for i, n in enumerate(m["benchmarks"]):
            ax.bar([j + i * width for j in range(len(rows))], [m["benchmarks"][n][t].get(k, 0) for t, k in rows],
                   width, label=n)
        ax.axhline(0.25, color="grey", ls="--", lw=1, label="chance (choice tasks)")
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))],
                      [f"{t.split('_', 1)[-1]}\n{k}" for t, k in rows], fontsize=8)
        ax.set(ylabel="score (higher is better)", title="Domain benchmarks", ylim=(0, 1))
        ax.legend(fontsize=8)
        pictures.append(("Domain benchmarks", _png(fig)))
        plt.close(fig)
    return pictures


def render_report(pretrain: Artifact, m: dict) -> str:
    e = html.escape
    sources = list(next(iter(m["scores"].values())))
    rows = "".join(
        f"<tr><td>{e(name)}</td>" + "".join(f"<td>{per[s]['bpb']:.3f}</td><td>{per[s]['ppl']:.1f}</td>" for s in sources)
        + "</tr>" for name, per in m["scores"].items())
    head = "".join(f"<th>{e(s)} bpb</th><th>{e(s)} ppl</th>" for s in sources)
    margins = "".join(f"<li><b>{e(s)}</b>: specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f} "
                      f"bits/byte: {abs(g['relative']):.1%} {'better' if g['relative'] > 0 else 'worse'}</li>"
                      for s, g in m["margins"].items())
    models = "".join(
        f"<tr><td>{e(n)}</td><td>{mm['shape']['params'] / 1e6:.2f}M</td><td>{mm['tokens'] / 1e6:.2f}M</td>"
        f"<td>{mm['steps']}</td><td>{mm['domain_epochs']:.2f}</td><td>{mm['flops']:.2e}</td>"
        f"<td>{mm['train_time_s']:.0f}s</td><td>{mm['tokens_per_s']:,.0f}</td>"
        f"<td>{(mm['mfu'] or 0):.1%}</td></tr>" for n, mm in pretrain.manifest["metrics"]["models"].items())
    pics = "".join(f"<h3>{e(t)}</h3><img alt='{e(t)}' src='{uri}'>" for t, uri in loss_curves(pretrain))
    charts = "".join(f"<img alt='{e(t)}' src='{uri}'>" for t, uri in score_charts(m))
    bench_rows = ""
    if m.get("benchmarks"):
        names = list(m["benchmarks"])
        for task, metric in _bench_rows(m):
            ref = _reference(m, task, metric)
            bench_rows += f"<tr><td>{e(task)} · {e(metric)}</td>" + "".join(
                f"<td>{m['benchmarks'][n].get(task, {}).get(metric, float('nan')):.3f}</td>" for n in names) + \
                f"<td>{ref}</td></tr>"
        bench_rows = ("<h2>Domain benchmarks (lm-evaluation-harness)</h2><table><tr><th>task · metric</th>" +
                      "".join(f"<th>{e(n)}</th>" for n in names) + "<th>chance / best trivial rule</th></tr>" +
                      bench_rows + "</table>")
    samples = "".join(
        f"<div class='s'><p class='p'>{e(p)}</p>" + "".join(f"<p><b>{e(o['model'])}</b>: {e(o['completion'])}</p>"
                                                          for o in outs) + "</div>" for p, outs in m["samples"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slmforge report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}.s{{border-left:3px solid #69c;padding-left:8px;margin:8px 0}}.p{{color:#555}}</style></head>
<body><h1>slmforge report</h1>
<h2>Bits per byte on the test splits (lower is better)</h2><table><tr><th>model</th>{head}</tr>{rows}</table>
<ul>{margins}</ul>
{charts}
{bench_rows}
<h2>Models</h2><table><tr><th>model</th><th>params</th><th>tokens</th><th>steps</th><th>domain epochs</th>
<th>FLOPs</th><th>time</th><th>tokens/s</th><th>MFU</th></tr>{models}</table>
<h2>Loss curves</h2>{pics}
<h2>Greedy samples</h2>{samples}
</body></html>"""


def render_markdown(pretrain: Artifact, m: dict) -> str:
    sources = list(next(iter(m["scores"].values())))
    lines = ["# slmforge report", "", "## Bits per byte (lower is better)", "",
             "| model | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    lines += [f"| {n} | " + " | ".join(f"{per[s]['bpb']:.3f}" for s in sources) + " |" for n, per in m["scores"].items()]
    lines += [""] + [f"- {s}: specialist {g['specialist_bpb']:.3f} vs generalist {g['generalist_bpb']:.3f} "
                     f"({g['relative']:+.1%})" for s, g in m["margins"].items()]
    return "\n".join(lines) + "\n"
