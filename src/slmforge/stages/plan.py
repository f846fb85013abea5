"""plan: what model should I train? Size N and training tokens D from a compute budget and the domain data.

Three rules, applied in this order (`recommend` documents each one; every correction adds a note):

1. **Chinchilla** (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"): training
   costs C ≈ 6·N·D FLOPs and the compute-optimal model sees D ≈ 20·N tokens, so N = sqrt(C/120),
   D = 20·N. N counts every parameter, embeddings included, as Chinchilla does.
2. **Data-constrained** (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"): a
   repeated token is worth less than a fresh one. With U unique tokens seen for D tokens
   (R = D/U − 1 repetitions) the effective data is D' = U + U·R_D*·(1 − exp(−R/R_D*)), R_D* ≈ 15.4;
   up to ~4 epochs repeated data is nearly as good as fresh. When Chinchilla's D would need more than
   `max_epochs` passes over the domain tokens, D is capped at `max_epochs`·U and the rest of the
   compute goes into a larger model, N = C/(6·D), but only up to (1 + R_N*)·U/20 parameters
   (R_N* ≈ 5.3): U/20 is the Chinchilla size for one pass over the data, and past R_N* "excess"
   parameters a further parameter is worth less than 1/e of one that has fresh data to learn from.
   The effective size never exceeds (1 + R_N*)·U/20, however large the model; compute beyond that
   point is reported as unused.
3. **Inference-heavy use** (Sardana et al. 2023, "Beyond Chinchilla-Optimal: Accounting for
   Inference in Language Model Scaling Laws"): with `inference_tokens` > 0, choose the N that
   minimises training + inference FLOPs, 6·N·D + 2·N·inference_tokens, among the models that reach
   the Chinchilla-optimal model's loss under the parametric fit L(N, D) = E + A/N^α + B/D^β
   (Hoffmann's E=1.69, A=406.4, B=410.7, α=0.34, β=0.28, with Muennighoff's effective N' and D' when
   data repeats): a smaller model trained on more tokens. Training then needs more FLOPs than the
   budget, and the whole deployment fewer; both are reported.

The fitted constants come from other corpora and tokenizers (MassiveText; C4); absolute loss values
do not transfer to a domain corpus, only the comparisons between allocations do.

Besides the stage (`run`), `recommend`, `budget_flops`, `probe_peak_flops` and `answer` (what the
recipe-free `slmforge plan --hours 24 --device h100 --domain-tokens 1e9` prints) are plain functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from slmforge.artifacts import Artifact, ArtifactStore, write_json_atomic
from slmforge.config import StageConfig
from slmforge.errors import UserError
from slmforge.hardware import CPU, DEVICES, cpu_peak, probe_peak_flops  # noqa: F401 (re-exported)
from slmforge.records import Tokenized, read_documents

NAME = "plan"
INPUTS = ("tokenizer",)

# Hoffmann et al. 2022, Approach 3 (parametric fit on MassiveText).
CHINCHILLA_FIT = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# Muennighoff et al. 2023: fitted decay constants for repeated data and excess parameters
# (15.387756 and 5.309743 in huggingface/datablations).
R_D_STAR = 15.4
R_N_STAR = 5.3
ADAMW_BYTES_PER_PARAM = 16  # bf16 weights + bf16 grads + fp32 master weights + two fp32 Adam moments


class Config(StageConfig):
    """The compute budget (FLOPs, or hours on a device) and how the model will be used."""

    flops: float | None = Field(None, gt=0, description="training budget in FLOPs (or give `hours`)")
    hours: float | None = Field(None, gt=0, description="training budget in hours on `device` (or give `flops`)")
    device: str | None = Field(
        CPU, description=f"GPU for `hours`: {', '.join(DEVICES)}; or cpu = measure this machine's bf16 matmul peak")
    peak_flops: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device, instead of looking `device` up (e.g. 989e12)")
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation: share of the peak training achieves")
    n_devices: int = Field(1, ge=1, description="devices training together")
    inference_tokens: float = Field(
        0.0, ge=0, description="tokens the model will process over its life; > 0 favours a smaller, longer-trained model")
    max_epochs: float = Field(4.0, ge=1, description="passes over the unique domain tokens before the data, not "
                                                      "compute, limits the plan (Muennighoff et al.: ~4 cost little)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str | None) -> str | None:
        if v is not None:
            v = v.strip().lower()
            problem = _device_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        problems = _budget_problems(self.flops, self.hours, self.device, self.peak_flops)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _device_problem(device: str) -> str | None:
    if device == CPU or device in DEVICES:
        return None
    return (f"unknown device {device!r}; known: {', '.join([*DEVICES, CPU])} (cpu = measure this machine), "
            f"or give `peak_flops` in FLOP/s")


def _budget_problems(flops, hours, device, peak_flops) -> list[str]:
    if flops is not None and hours is not None:
        return ["`flops` and `hours` are both set; the budget is either FLOPs or hours on a device. Choose one."]
    if flops is None and hours is None:
        return ["no budget: set `flops` (e.g. 1e18) or `hours` on a `device` (e.g. hours: 24, device: h100)"]
    if hours is not None and device is None and peak_flops is None:
        return ["`hours` needs a `device` (or `peak_flops` in FLOP/s) to turn time into FLOPs"]
    return []


# ---- the rules ----------------------------------------------------------------------------------------------

def effective_tokens(tokens: float, unique_tokens: float, r_star: float = R_D_STAR) -> float:
    """Muennighoff et al. 2023: D' = U + U·R*·(1 − exp(−R/R*)), R = D/U − 1 repetitions (D' = D without any)."""
    if math.isinf(unique_tokens) or tokens <= unique_tokens:
        return tokens
    r = tokens / unique_tokens - 1
    return unique_tokens + unique_tokens * r_star * (1 - math.exp(-r / r_star))


def effective_params(params: float, unique_tokens: float, tokens_per_param: float = 20.0,
                     r_star: float = R_N_STAR) -> float:
    """Muennighoff et al. 2023: parameters beyond U_N = U/20 (the Chinchilla size for one pass over
    the unique data) are worth less: N' = U_N + U_N·R_N*·(1 − exp(−R_N/R_N*)), R_N = N/U_N − 1."""
    if math.isinf(unique_tokens):
        return params
    u_n = min(params, unique_tokens / tokens_per_param)
    r = params / u_n - 1
    return u_n + u_n * r_star * (1 - math.exp(-r / r_star))


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al. 2022's parametric fit L(N, D) = E + A/N^α + B/D^β (nats/token on MassiveText)."""
    f = CHINCHILLA_FIT
    return f["E"] + f["A"] / params ** f["alpha"] + f["B"] / tokens ** f["beta"]


def predicted_loss(params: float, tokens: float, unique_tokens: float, tokens_per_param: float = 20.0) -> float:
    """Chinchilla's fit with Muennighoff's effective parameters and data (equal to it without repetition)."""
    return chinchilla_loss(effective_params(params, unique_tokens, tokens_per_param),
                           effective_tokens(tokens, unique_tokens))


def _tokens_for_loss(target: float, params: float, unique_tokens: float, tokens_per_param: float) -> float:
    """Training tokens D that bring a model of `params` to `target` loss; inf if it cannot get there."""
    f = CHINCHILLA_FIT
    rest = target - f["E"] - f["A"] / effective_params(params, unique_tokens, tokens_per_param) ** f["alpha"]
    if rest <= 0:
        return math.inf
    eff = (f["B"] / rest) ** (1 / f["beta"])  # effective tokens needed
    if math.isinf(unique_tokens) or eff <= unique_tokens:
        return eff
    x = (eff / unique_tokens - 1) / R_D_STAR  # invert D' = U + U·R*·(1 − exp(−R/R*))
    if x >= 1:
        return math.inf  # more effective data than repeating U could ever give
    return unique_tokens * (1 - R_D_STAR * math.log(1 - x))


def _overtrain(target: float, inference_tokens: float, n_chinchilla: float, unique_tokens: float,
               max_tokens: float, tokens_per_param: float) -> tuple[float, float] | None:
    """Sardana et al. 2023: the N (and the D it needs) reaching `target` loss at the least training +
    inference FLOPs, with D <= max_tokens. A log-spaced grid over N, then a finer one around the best."""

    def cost(log_n: float) -> float:
        n = math.exp(log_n)
        d = _tokens_for_loss(target, n, unique_tokens, tokens_per_param)
        return 6 * n * d + 2 * n * inference_tokens if d <= max_tokens else math.inf

    f = CHINCHILLA_FIT
    lo = math.log((f["A"] / (target - f["E"])) ** (1 / f["alpha"]))  # even infinite data needs this many params
    hi = math.log(10 * n_chinchilla)
    for _ in range(4):
        grid = [lo + (hi - lo) * i / 400 for i in range(401)]
        costs = [cost(x) for x in grid]
        best = min(range(len(grid)), key=costs.__getitem__)
        if math.isinf(costs[best]):
            return None
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    n = math.exp(grid[best])
    return n, _tokens_for_loss(target, n, unique_tokens, tokens_per_param)


def recommend(compute_flops: float, unique_domain_tokens: float, inference_tokens: float = 0.0,
              max_epochs: float = 4.0, tokens_per_param: float = 20.0) -> dict:
    """What to train with `compute_flops` of training compute and `unique_domain_tokens` of data.

    Rules (module docstring): Chinchilla N = sqrt(C/(6·k)), D = k·N (k = `tokens_per_param`, 20 in
    Hoffmann et al. 2022); if D > `max_epochs`·U, then D = `max_epochs`·U and N = C/(6·D), at most
    max((1 + R_N*)·U/k, D/k) (Muennighoff et al. 2023: beyond that, excess parameters are worth less
    than 1/e of a fresh one; the rest of the budget is left unused and said so); with
    `inference_tokens` > 0 and data to spare, the N minimising 6·N·D + 2·N·inference_tokens at the
    Chinchilla model's loss (Sardana et al. 2023), with D still at most `max_epochs`·U. Hoffmann's
    fitted law has its own compute optimum, which is not exactly D = 20·N, so with few inference
    tokens this answer can differ from plain Chinchilla by that alone.

    Returns params, tokens, epochs, effective_tokens (D'), tokens_per_param, flops_used (6·N·D),
    budget_flops, total_flops (training + 2·N·inference_tokens), train_state_gb (AdamW, 16 bytes per
    parameter, activations excluded), loss_estimate, limited_by ("compute", "data", "data+params",
    "inference" or "inference+data"), the plain Chinchilla chinchilla_params/_tokens/_epochs/_total_flops/_loss_estimate,
    and `notes`: one sentence per rule applied.
    """
    c, u, inf_tok, k = _checked(compute_flops, unique_domain_tokens, inference_tokens, max_epochs, tokens_per_param)
    n_c = math.sqrt(c / (6 * k))
    d_c = k * n_c
    notes = [(f"Chinchilla (Hoffmann et al. 2022): C = 6·N·D with D = {k:g}·N gives N = {_si(n_c)} parameters "
              f"and D = {_si(d_c)} tokens for {c:.3g} FLOPs.")]
    n, d, limited_by = n_c, d_c, "compute"
    if d_c > max_epochs * u:
        n, d, limited_by, more = _data_constrained(c, u, d_c, inf_tok, max_epochs, k)
        notes += more
    elif inf_tok > 0 and (found := _inference_heavy(c, u, n_c, d_c, inf_tok, max_epochs, k)) is not None:
        n, d, limited_by, more = found
        notes += more
    return _result(n, d, limited_by, n_c, d_c, c, u, inf_tok, max_epochs, k, notes)


def _checked(compute_flops, unique_domain_tokens, inference_tokens, max_epochs, tokens_per_param) -> tuple:
    """recommend()'s numbers as floats (C, U, inference tokens, k), or a UserError naming every bad one."""
    c, u, inf_tok, k = float(compute_flops), float(unique_domain_tokens), float(inference_tokens), float(tokens_per_param)
    problems = []
    if not c > 0 or math.isinf(c):
        problems.append(f"compute_flops must be a positive number (got {compute_flops!r})")
    if not u > 0:
        problems.append(f"unique_domain_tokens must be positive (got {unique_domain_tokens!r})")
    if not inf_tok >= 0 or math.isinf(inf_tok):
        problems.append(f"inference_tokens must be >= 0 (got {inference_tokens!r})")
    if not max_epochs >= 1:
        problems.append(f"max_epochs must be >= 1 (got {max_epochs!r})")
    if not k > 0:
        problems.append(f"tokens_per_param must be positive (got {tokens_per_param!r})")
    if problems:
        raise UserError("plan: " + "; ".join(problems))
    return c, u, inf_tok, k


def _data_constrained(c: float, u: float, d_c: float, inf_tok: float, max_epochs: float,
                      k: float) -> tuple[float, float, str, list[str]]:
    """Rule 2: Chinchilla's D would repeat the data more than `max_epochs` times; D is capped there and the
    rest of the compute buys a larger model, up to (1 + R_N*)·U/k parameters. (N, D, limited_by, notes)."""
    d = max_epochs * u
    n_max = max((1 + R_N_STAR) * u / k, d / k)
    n = min(c / (6 * d), n_max)
    limited_by = "data+params" if c / (6 * d) > n_max else "data"
    notes = [(
        f"Data-constrained (Muennighoff et al. 2023): {_si(d_c)} tokens would be {d_c / u:.1f} epochs over the "
        f"{_si(u)} unique domain tokens; up to ~4 epochs repeated data is nearly as good as fresh, so training "
        f"stops at {max_epochs:g} epochs = {_si(d)} tokens, worth {_si(effective_tokens(d, u))} fresh ones "
        f"(D' = U + U·R*·(1 − exp(−R/R*)), R* = {R_D_STAR}).")]
    if limited_by == "data":
        notes.append(f"The rest of the compute buys a larger model: N = C/(6·D) = {_si(n)} "
                     f"({d / n:.1f} tokens per parameter).")
    else:
        notes.append(
            f"The rest of the compute would buy a larger model, but only up to (1 + R_N*)·U/{k:g} = {_si(n_max)} "
            f"parameters (R_N* = {R_N_STAR}): past that, a further parameter is worth less than 1/e of one with "
            f"fresh data, so only {100 * n * 6 * d / c:.2g}% of the budget is used. More domain data, general text "
            f"mixed in, or a higher max_epochs (repeats lose value with R* = {R_D_STAR}; little is left "
            f"after ~16 epochs) would use it.")
    if inf_tok > 0:
        notes.append("Inference: with the data as the limit there are no spare tokens to over-train a smaller "
                     "model on; the plan stays as above.")
    return n, d, limited_by, notes


def _inference_heavy(c: float, u: float, n_c: float, d_c: float, inf_tok: float, max_epochs: float,
                     k: float) -> tuple[float, float, str, list[str]] | None:
    """Rule 3: the smaller model, trained longer, that reaches the Chinchilla model's loss at the least
    training + inference FLOPs (N, D, limited_by, notes); None when there is none."""
    d_cap = max_epochs * u
    target = predicted_loss(n_c, d_c, u, k)
    found = _overtrain(target, inf_tok, n_c, u, d_cap, k)
    if found is None:
        return None
    n, d = found
    total, total_c = 6 * n * d + 2 * n * inf_tok, 6 * n_c * d_c + 2 * n_c * inf_tok
    notes = [(
        f"Inference-heavy (Sardana et al. 2023): for {_si(inf_tok)} inference tokens, N = {_si(n)} trained on "
        f"{_si(d)} tokens ({d / n:.0f} tokens per parameter) reaches the Chinchilla model's loss "
        f"({target:.3f} on Hoffmann's fit) for {total:.3g} training + inference FLOPs instead of "
        f"{total_c:.3g} ({1 - total / total_c:.0%} less); its training takes {6 * n * d / c:.2f}× the budget.")]
    if d >= d_cap * (1 - 1e-3):
        notes.append(f"Over-training stops at {max_epochs:g} epochs over the domain data.")
        return n, d, "inference+data", notes
    return n, d, "inference", notes


def _result(n: float, d: float, limited_by: str, n_c: float, d_c: float, c: float, u: float, inf_tok: float,
            max_epochs: float, k: float, notes: list[str]) -> dict:
    """recommend()'s mapping: the plan (N, D), plain Chinchilla's (N_c, D_c) beside it, and the notes."""
    epochs, epochs_c = (0.0, 0.0) if math.isinf(u) else (d / u, d_c / u)
    return {
        "params": n,
        "tokens": d,
        "epochs": epochs,
        "effective_tokens": effective_tokens(d, u),
        "tokens_per_param": d / n,
        "flops_used": 6 * n * d,
        "budget_flops": c,
        "total_flops": 6 * n * d + 2 * n * inf_tok,
        "train_state_gb": ADAMW_BYTES_PER_PARAM * n / 1e9,
        "loss_estimate": predicted_loss(n, d, u, k),
        "limited_by": limited_by,
        "unique_domain_tokens": u,
        "inference_tokens": inf_tok,
        "max_epochs": float(max_epochs),
        "chinchilla_params": n_c,
        "chinchilla_tokens": d_c,
        "chinchilla_epochs": epochs_c,
        "chinchilla_total_flops": 6 * n_c * d_c + 2 * n_c * inf_tok,
        "chinchilla_loss_estimate": predicted_loss(n_c, d_c, u, k),
        "notes": notes,
    }


# ---- the budget ---------------------------------------------------------------------------------------------

def budget_flops(flops: float | None = None, hours: float | None = None, device: str | None = None,
                 peak_flops: float | None = None, mfu: float = 0.4, n_devices: int = 1) -> tuple[float, str]:
    """The training budget in FLOPs, and a sentence saying how it was reckoned.

    Either `flops` directly, or `hours` on `n_devices` devices: FLOPs = hours·3600·peak·mfu·n_devices,
    with peak = `peak_flops` if given, else the bf16 dense figure of `device` from DEVICES, or for
    "cpu" this machine's bf16 matmul speed, measured once and cached by hardware.cpu_peak().
    """
    if device is not None:
        device = device.strip().lower()
    problems = _budget_problems(flops, hours, device, peak_flops)
    if device is not None and (problem := _device_problem(device)):
        problems.append(problem)
    for key, value in (("flops", flops), ("hours", hours), ("peak_flops", peak_flops)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            problems.append(f"`{key}` must be a positive number (got {value!r})")
    if not 0 < mfu <= 1:
        problems.append(f"`mfu` must be in (0, 1] (got {mfu!r})")
    if n_devices < 1:
        problems.append(f"`n_devices` must be at least 1 (got {n_devices!r})")
    if problems:
        raise UserError("plan: " + "; ".join(problems))
    if flops is not None:
        return float(flops), f"{flops:.3g} FLOPs"
    if peak_flops is not None:
        peak, what = float(peak_flops), f"{peak_flops / 1e12:g} TFLOP/s peak"
    elif device == CPU:
        probe = cpu_peak()
        peak = probe["bf16"]
        what = (f"cpu ({probe['threads']} threads, bf16 matmul measured at {peak / 1e12:.2f} TFLOP/s on "
                f"{probe['measured']}, fp32 {probe['fp32'] / 1e12:.2f})")
    else:
        peak, what = DEVICES[device], f"{device} ({DEVICES[device] / 1e12:g} TFLOP/s bf16 dense peak)"
    total = hours * 3600 * peak * mfu * n_devices
    devices = f"{n_devices} × " if n_devices > 1 else ""
    return total, f"{hours:g} h on {devices}{what} at MFU {mfu:g} = {total:.3g} FLOPs"


# ---- the stage ----------------------------------------------------------------------------------------------

def run(cfg: Config, store: ArtifactStore, inputs: dict[str, Artifact] | None = None, force: bool = False) -> Artifact:
    inputs = inputs or {"tokenizer": store.resolve("tokenizer:latest")}
    return store.build(NAME, cfg, inputs, lambda out: _build(cfg, store, inputs["tokenizer"], out), force=force)


def count_domain_tokens(store: ArtifactStore, tokenizer: Artifact, batch: int = 256) -> dict:
    """Tokens (no special tokens) of the domain sources' train split, encoded with the trained tokenizer.
    The curate artifact is the tokenizer's input; the domain sources are those it was trained on."""
    from tokenizers import Tokenizer

    curate = store.load("curate", tokenizer.manifest["inputs"]["curate"])
    tokenized = Tokenized.of(tokenizer)
    sources = tokenized.trained_on
    tok = Tokenizer.from_file(str(tokenized.folder() / "tokenizer.json"))
    tokens = docs = 0
    texts: list[str] = []

    def flush() -> int:
        n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        texts.clear()
        return n

    for source in sources:
        for row in read_documents(curate.path / "data" / "train", source, columns=["text"]):
            texts.append(row["text"])
            docs += 1
            if len(texts) >= batch:
                tokens += flush()
    tokens += flush()
    if tokens == 0:
        raise UserError(f"plan: the train split of {', '.join(sources)} holds no tokens; check the curate stage's "
                        f"output ({curate.path})")
    return {"domain_sources": sources, "domain_documents": docs, "unique_domain_tokens": tokens}


def _build(cfg: Config, store: ArtifactStore, tokenizer: Artifact, out: Path) -> dict:
    domain = count_domain_tokens(store, tokenizer)
    flops, how = budget_flops(cfg.flops, cfg.hours, cfg.device, cfg.peak_flops, cfg.mfu, cfg.n_devices)
    rec = recommend(flops, domain["unique_domain_tokens"], cfg.inference_tokens, cfg.max_epochs)
    metrics = {**rec, "budget": how, "domain_sources": domain["domain_sources"],
               "domain_documents": domain["domain_documents"]}
    write_json_atomic(out / "plan.json", metrics)
    print_plan(metrics)
    return metrics


# ---- output -------------------------------------------------------------------------------------------------

def _si(x: float) -> str:
    """1.02e10 -> '10.2B', 3.15e8 -> '315M'."""
    if math.isinf(x):
        return "unlimited"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def print_plan(rec: dict, console=None) -> None:
    """A small rich table: the recommendation beside plain Chinchilla, then the notes."""
    from rich.table import Table

    if console is None:
        from slmforge.console import console
    console.print(f"budget: {rec.get('budget') or format(rec['budget_flops'], '.3g') + ' FLOPs'}")
    t = Table(title=f"plan ({rec['limited_by']} is the limit)", title_justify="left")
    for col in ("", "recommended", "Chinchilla-optimal"):
        t.add_column(col, justify="right" if col else "left")
    n, n_c = rec["params"], rec["chinchilla_params"]
    d, d_c = rec["tokens"], rec["chinchilla_tokens"]
    u = rec["unique_domain_tokens"]
    t.add_row("parameters (N)", _si(n), _si(n_c))
    t.add_row("training tokens (D)", _si(d), _si(d_c))
    t.add_row("tokens per parameter", f"{d / n:.1f}", f"{d_c / n_c:.1f}")
    t.add_row(f"epochs over {_si(u)} domain tokens", f"{rec['epochs']:.2f}", f"{rec['chinchilla_epochs']:.2f}")
    t.add_row("effective tokens (D')", _si(rec["effective_tokens"]), "")
    t.add_row("training FLOPs", f"{rec['flops_used']:.3g}", f"{6 * n_c * d_c:.3g}")
    if rec["inference_tokens"] > 0:
        t.add_row(f"+ inference on {_si(rec['inference_tokens'])} tokens", f"{rec['total_flops']:.3g}",
                  f"{rec['chinchilla_total_flops']:.3g}")
    t.add_row("AdamW training state", f"{rec['train_state_gb']:.3g} GB", f"{ADAMW_BYTES_PER_PARAM * n_c / 1e9:.3g} GB")
    t.add_row("loss estimate (Hoffmann fit)", f"{rec['loss_estimate']:.3f}", f"{rec['chinchilla_loss_estimate']:.3f}")
    console.print(t)
    for note in rec["notes"]:
        console.print(f"- {note}")


class CliConfig(Config):
    """`slmforge plan` without a recipe: the budget (the stage's Config) and the domain data size, which the
    stage counts from the tokenized train split."""

    domain_tokens: float = Field(..., description="unique domain tokens (e.g. 1e9)")


def answer(cfg: CliConfig, as_json: bool = False) -> dict:
    """`slmforge plan` without a recipe: the recommendation for `cfg`'s budget and domain tokens, printed as a
    table (or as JSON) and returned."""
    flops, how = budget_flops(cfg.flops, cfg.hours, cfg.device, cfg.peak_flops, cfg.mfu, cfg.n_devices)
    rec = {**recommend(flops, cfg.domain_tokens, cfg.inference_tokens, cfg.max_epochs), "budget": how}
    if as_json:
        print(json.dumps(rec, indent=2))
    else:
        from rich.console import Console

        out = Console(highlight=False)
        if not out.is_terminal:
            out.width = 120
        print_plan(rec, out)
    return rec
