import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from slmforge.artifacts import ArtifactStore
from slmforge.cli import main
from slmforge.config import StageConfig
from slmforge.errors import UserError
from slmforge.records import DOCUMENT_SCHEMA, Document
from slmforge.stages import plan
from slmforge.stages.tokenizer import train_bpe

UNLIMITED = 1e15  # unique tokens far beyond any budget here


def test_chinchilla_arithmetic():
    c = 1e21
    r = plan.recommend(c, UNLIMITED)
    n, d = r["params"], r["tokens"]
    assert 6 * n * d == pytest.approx(c, rel=0.01)
    assert d / n == pytest.approx(20, rel=0.01)
    assert n == pytest.approx(math.sqrt(c / 120), rel=1e-9)
    assert (r["chinchilla_params"], r["chinchilla_tokens"]) == (n, d)
    assert r["limited_by"] == "compute" and r["flops_used"] == pytest.approx(c)
    assert len(r["notes"]) == 1 and "Hoffmann" in r["notes"][0]


def test_effective_data_equals_unique_tokens_at_one_epoch_and_is_below_d_when_repeating():
    u = 1e9
    assert plan.effective_tokens(u, u) == u
    assert plan.effective_tokens(0.5 * u, u) == 0.5 * u
    for epochs in (2, 4, 16, 100):
        eff = plan.effective_tokens(epochs * u, u)
        assert u < eff < epochs * u
    assert plan.effective_tokens(4 * u, u) > 0.9 * 4 * u  # up to ~4 epochs repeats are nearly as good as fresh
    assert plan.effective_tokens(1e6 * u, u) == pytest.approx((1 + plan.R_D_STAR) * u)  # the most repeats are worth


def test_epoch_cap_kicks_in_when_unique_tokens_are_scarce():
    c, u = 1e21, 1e9  # Chinchilla wants ~58B tokens: 58 epochs over 1B
    r = plan.recommend(c, u)
    assert r["chinchilla_epochs"] > 4
    assert r["epochs"] == pytest.approx(4) and r["tokens"] == pytest.approx(4 * u)
    assert r["effective_tokens"] < r["tokens"]
    assert r["effective_tokens"] == pytest.approx(plan.effective_tokens(4 * u, u))
    assert r["params"] == pytest.approx((1 + plan.R_N_STAR) * u / 20)  # no bigger than the data supports
    assert r["flops_used"] < c and r["limited_by"] == "data+params"
    assert any("Muennighoff" in note for note in r["notes"])

    # a little over the cap: all the compute goes into a larger model, N = C/(6·D)
    c2 = 6 * (4.5 * u / 20) * (4.5 * u)
    r2 = plan.recommend(c2, u)
    assert r2["limited_by"] == "data" and r2["tokens"] == pytest.approx(4 * u)
    assert r2["params"] == pytest.approx(c2 / (6 * 4 * u)) and r2["params"] > r2["chinchilla_params"]
    assert r2["flops_used"] == pytest.approx(c2)

    assert plan.recommend(c2, u, max_epochs=8)["limited_by"] == "compute"


def test_inference_heavy_use_trains_a_smaller_model_on_more_tokens_to_the_same_loss():
    c = 1e21
    base = plan.recommend(c, UNLIMITED)
    r = plan.recommend(c, UNLIMITED, inference_tokens=1e13)
    assert r["params"] < base["params"] and r["tokens"] > base["tokens"]
    assert r["tokens_per_param"] > 20
    target = plan.chinchilla_loss(base["params"], base["tokens"])
    assert plan.chinchilla_loss(r["params"], r["tokens"]) == pytest.approx(target, rel=0.005)
    assert r["total_flops"] < r["chinchilla_total_flops"] == pytest.approx(c + 2 * base["params"] * 1e13)
    more = plan.recommend(c, UNLIMITED, inference_tokens=1e14)
    assert more["params"] < r["params"]  # more inference, smaller model
    assert r["limited_by"] == "inference" and any("Sardana" in n for n in r["notes"])


def test_over_training_never_exceeds_the_epoch_cap():
    c, u = 1e21, 100e9  # Chinchilla's ~58B tokens fit in one pass; over-training would want far more
    r = plan.recommend(c, u, inference_tokens=1e14)
    assert r["tokens"] <= 4 * u * (1 + 1e-9) and r["limited_by"] == "inference+data"
    assert r["params"] < r["chinchilla_params"]
    assert r["loss_estimate"] == pytest.approx(r["chinchilla_loss_estimate"], rel=0.005)


def test_recommend_rejects_nonsense():
    with pytest.raises(UserError, match="compute_flops"):
        plan.recommend(0, 1e9)
    with pytest.raises(UserError, match="unique_domain_tokens"):
        plan.recommend(1e18, -1)


def test_budget_from_hours_on_h100():
    flops, how = plan.budget_flops(hours=24, device="H100")
    assert flops == pytest.approx(24 * 3600 * 989e12 * 0.4)
    assert "h100" in how and "989" in how
    flops8, _ = plan.budget_flops(hours=24, device="h100", n_devices=8, mfu=0.5)
    assert flops8 == pytest.approx(24 * 3600 * 989e12 * 0.5 * 8)
    assert plan.budget_flops(hours=2, peak_flops=1e12, mfu=1)[0] == pytest.approx(7.2e15)
    assert plan.budget_flops(flops=3e20)[0] == 3e20


def test_budget_validation_names_the_keys():
    with pytest.raises(UserError) as e:
        plan.budget_flops(flops=1e20, hours=3, device="h100")
    assert "flops" in str(e.value) and "hours" in str(e.value) and "Choose one" in str(e.value)
    with pytest.raises(UserError, match="flops.*hours"):
        plan.budget_flops()
    with pytest.raises(UserError) as e:
        plan.budget_flops(hours=3, device="tpu9000")
    assert "tpu9000" in str(e.value) and "h100" in str(e.value) and "rtx4090" in str(e.value)


def test_config_validation():
    with pytest.raises(ValidationError) as e:
        plan.Config(flops=1e20, hours=3)
    assert "`flops` and `hours`" in str(e.value) and "Choose one" in str(e.value)
    with pytest.raises(ValidationError) as e:
        plan.Config(hours=3, device="tpu9000")
    assert "unknown device 'tpu9000'" in str(e.value) and "a100" in str(e.value)
    with pytest.raises(ValidationError, match="no budget"):
        plan.Config()
    cfg = plan.Config(hours=1, device="RTX4090")
    assert cfg.device == "rtx4090" and cfg.mfu == 0.4 and cfg.max_epochs == 4.0


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--hours", "8760", "--device", "h100", "--domain-tokens", "1e15"]) == 0
    out = capsys.readouterr().out
    assert "10.2B" in out and "204B" in out  # N = sqrt(1.25e22 / 120), D = 20·N

    assert main(["plan", "--flops", "1e21", "--domain-tokens", "1e15", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["params"] == pytest.approx(math.sqrt(1e21 / 120))


@pytest.mark.parametrize("argv", [
    ["--flops", "1e20", "--hours", "3", "--domain-tokens", "1e9"],
    ["--hours", "3", "--device", "tpu9000", "--domain-tokens", "1e9"],
    ["--flops", "1e20"],  # --domain-tokens is required
    ["--flops", "-5", "--domain-tokens", "1e9"],
])
def test_cli_bad_input_exits_2(argv, capsys):
    assert main(["plan", *argv]) == 2
    assert "error:" in capsys.readouterr().err


def test_probe_returns_positive_figures():
    r = plan.probe_peak_flops(seconds=0.01, sizes=(32,))
    assert r["fp32"] > 0 and r["bf16"] > 0


class _Fake(StageConfig):
    pass


def test_stage_counts_domain_train_tokens_and_writes_the_plan(tmp_path):
    """A hand-made curate artifact and tokenizer artifact (no ingest, no datatrove, no transformers)."""
    store = ArtifactStore(tmp_path / "w")
    docs = {"pg": [f"SELECT {i} FROM pg_class WHERE relkind = 'r'; -- table number {i}" for i in range(40)],
            "prose": ["Call me Ishmael. Some years ago, never mind how long precisely."] * 5}

    def fake_curate(out):
        for source, texts in docs.items():
            rows = [Document(f"{source}-{i}", source, "", t).to_row() for i, t in enumerate(texts)]
            for split in ("train", "val"):
                (out / "data" / split / source).mkdir(parents=True)
                pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA),
                               out / "data" / split / source / "part-00000.parquet")
        return {"roles": {"pg": "domain", "prose": "general"}}

    curate = store.build("curate", _Fake(), {}, fake_curate)
    tok = train_bpe(iter(docs["pg"]), vocab_size=300, min_frequency=1)

    def fake_tokenizer(out):
        (out / "tokenizer").mkdir()
        tok.save(str(out / "tokenizer" / "tokenizer.json"))
        return {"trained_on": ["pg"], "vocab_size": tok.get_vocab_size()}  # what records.Tokenized reads

    tok_art = store.build("tokenizer", _Fake(), {"curate": curate}, fake_tokenizer)
    expected = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in docs["pg"])

    art = plan.run(plan.Config(flops=1e15), store, {"tokenizer": tok_art})
    m = art.manifest["metrics"]
    assert m["unique_domain_tokens"] == expected and m["domain_documents"] == 40
    assert m["domain_sources"] == ["pg"]
    assert m["epochs"] == pytest.approx(4) and m["limited_by"].startswith("data")  # a tiny corpus caps the plan
    assert json.loads((art.path / "plan.json").read_text())["params"] == m["params"]
    store.last_built = None
    again = plan.run(plan.Config(flops=1e15), store, {"tokenizer": tok_art})
    assert again.key == art.key and store.last_built is None  # cached, not rebuilt
