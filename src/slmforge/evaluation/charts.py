"""The report's pictures, as embeddable PNG data URLs (matplotlib, Agg backend).

Every chart keeps its legend outside the plotting area (to the right), writes each bar's value above it
(a zero in red, since a zero-height bar is invisible; a score that was not measured as "not scored"),
and gets wider with the number of bars, so that labels never run together.
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from pathlib import Path

from slmforge.common import read_jsonl
from slmforge.evaluation.results import bench_rows, set_tasks
from slmforge.records import set_of

ZERO = "#c0392b"
LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """The figure as an embeddable PNG data URL; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(text: str, width: int = 12) -> str:
    return "\n".join(textwrap.wrap(text.replace("_", " "), width)) or text


def grouped_bars(groups: list[str], names: list[str], values: dict, errors: dict | None = None,
                 ylabel: str = "", ylim: float | None = None, chance: dict | None = None, fmt: str = "{:.2f}"):
    """A figure of bars, one group per label in `groups` and one colour per model in `names`; `values`
    and `errors` map (model, group) to a value or None; `chance` maps a group to its chance level."""
    plt = _plt()
    n = max(len(names), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.3 * n * len(groups)), 3.8))
    top = max([v + (errors or {}).get(k, 0) for k, v in values.items() if v is not None] or [1.0])
    ymax = max(ylim, top + 0.14 * ylim) if ylim else top * 1.18
    for i, name in enumerate(names):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        vs = [values.get((name, g)) for g in groups]
        errs = [(errors or {}).get((name, g), 0) if v is not None else 0 for g, v in zip(groups, vs)]
        ax.bar(xs, [v or 0 for v in vs], width, label=name, yerr=errs if any(errs) else None,
                      error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#555"})
        for x, v, e in zip(xs, vs, errs):
            if v is None:
                ax.text(x, 0.01 * ymax, "not scored", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#888")
            elif v == 0:
                ax.plot([x - width / 2, x + width / 2], [0, 0], color=ZERO, lw=2.5, solid_capstyle="butt")
                ax.text(x, 0.01 * ymax, fmt.format(0), rotation=90, ha="center", va="bottom", fontsize=6.5,
                        color=ZERO, fontweight="bold")
            else:
                ax.text(x, v + e + 0.01 * ymax, fmt.format(v), rotation=90, ha="center", va="bottom", fontsize=7,
                        color="#333")
    for j, g in enumerate(groups):
        if chance and g in chance:
            ax.plot([j - 0.45, j + 0.45], [chance[g]] * 2, color="grey", ls="--", lw=1,
                    label="chance" if j == min(groups.index(c) for c in chance) else None)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set(ylabel=ylabel, ylim=(0, ymax))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(**LEGEND)
    return fig


def _ci(per_item: list[float] | None) -> float:
    """Half-width of the 95% interval of a mean over items (normal approximation)."""
    if not per_item or len(per_item) < 2:
        return 0.0
    k = len(per_item)
    mean = sum(per_item) / k
    return 1.96 * math.sqrt(sum((x - mean) ** 2 for x in per_item) / (k - 1) / k)


def chart_rows(m: dict) -> list[tuple[str, str]]:
    """(task, metric) of the benchmark chart: each choice set's headline metric, then the generation
    tasks' metrics (exact match, F1, the judge, ROUGE-L); every accuracy metric without a headline."""
    tasks = set_tasks(m)
    head = m.get("headline") or {}
    if not head:
        return [(t, k) for t, k in bench_rows(m) if k in ("acc", "acc_norm", "acc_mutual_info", "exact_match", "f1",
                                                            "rougeL", "judge")]
    rows = [(tasks[s], k) for s, k in head.items() if s in tasks]
    have = set(bench_rows(m))
    for s, k in (("qa", "exact_match"), ("qa", "f1"), ("qa", "judge"), ("summarization", "rougeL")):
        if s in tasks and (tasks[s], k) in have:
            rows.append((tasks[s], k))
    return rows


def score_charts(m: dict) -> list[tuple[str, str]]:
    """(title, PNG data URL): bits per byte per source, and the benchmark scores with their 95% intervals
    and chance marked."""
    pictures = []
    if m.get("scores"):
        names = list(m["scores"])
        sources = list(next(iter(m["scores"].values())))
        dom = set(m.get("domain_sources") or [])
        groups = [f"{s}\n({'domain' if s in dom else 'general'})" for s in sources]
        values = {(n, g): m["scores"][n][s]["bpb"] for n in names for s, g in zip(sources, groups)}
        pictures.append(("Test-split bits per byte (lower is better)",
                         png(grouped_bars(groups, names, values, ylabel="bits per byte (lower is better)"))))
    if m.get("benchmarks"):
        names = list(m["benchmarks"])
        rows = chart_rows(m)
        head = m.get("headline") or {}
        groups = [f"{set_of(t)}\n" + _label(k + (" (headline)" if head.get(set_of(t)) == k else "")) for t, k in rows]
        values, errors, chance = {}, {}, {}
        for (t, k), g in zip(rows, groups):
            base = (m.get("baselines") or {}).get(set_of(t))
            if base and k.startswith("acc"):
                chance[g] = base["chance"]
            for n in names:
                values[(n, g)] = m["benchmarks"][n].get(t, {}).get(k)
                errors[(n, g)] = _ci(((m.get("outcomes") or {}).get(n, {}).get(t) or {}).get(k))
        fig = grouped_bars(groups, names, values, errors, ylabel="score (higher is better)", ylim=1.0, chance=chance,
                           fmt="{:.3f}")
        pictures.append(("Domain benchmarks (bars: score; whiskers: 95% interval over the items)", png(fig)))
    return pictures


def loss_curves(models: dict) -> list[tuple[str, str]]:
    """(title, PNG data URL) for the training loss and the per-source validation losses of every
    pretrained model (its folder holds train_log.jsonl and val_log.jsonl): one colour per model, one line
    style per source."""
    plt = _plt()
    # pretraining runs only (they keep val_log.jsonl): SFT and DPO losses are on other scales
    logs = {n: Path(m["path"]) for n, m in models.items() if m.get("path") and (Path(m["path"]) / "val_log.jsonl").is_file()}
    if not logs:
        return []
    colours = {n: f"C{i % 10}" for i, n in enumerate(logs)}
    pictures = []
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, p in logs.items():
        rows = read_jsonl(p / "train_log.jsonl")
        kd = models[name].get("loss") == "kd"  # compress's distilled variants: their objective, not the LM loss
        ax.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], lw=1, color=colours[name],
                label=name + (" (KD objective)" if kd else ""))
    ax.set(xlabel="training tokens (M)", ylabel="train loss (nats/token)")
    ax.legend(**LEGEND)
    ax.grid(alpha=0.3)
    pictures.append(("Training loss", png(fig)))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    styles: dict[str, str] = {}
    for name, p in logs.items():
        rows = read_jsonl(p / "val_log.jsonl")
        for source in [k for k in (rows[0] if rows else {}) if k not in ("step", "tokens")]:
            ls = styles.setdefault(source, ("-", "--", ":", "-.")[len(styles) % 4])
            ax.plot([r["tokens"] / 1e6 for r in rows], [r[source] for r in rows], marker=".", ls=ls,
                    color=colours[name], label=f"{name} · {source}")
    ax.set(xlabel="training tokens (M)", ylabel="val loss (nats/token)")
    ax.legend(**LEGEND)
    ax.grid(alpha=0.3)
    pictures.append(("Validation loss per source", png(fig)))
    return pictures
