import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from slmforge.config import apply_overrides, load_recipe
from slmforge.errors import UserError
from tests.conftest import REPO, small_recipe, write_recipe


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe: Path):
    r = load_recipe(recipe)
    assert list(r.stages)[:3] == ["ingest", "curate", "tokenizer"]
    assert all(src.files for src in r.stages["ingest"].sources)


def test_unknown_wrong_type_and_missing_file_are_all_reported(tmp_path, small_corpus):
    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe["tokenizer"] = {"vocab_sise": 1000}
    recipe["curate"] = {"val_fraction": "lots"}
    recipe["ingest"]["sources"][0]["paths"].append("nope/missing.txt")
    recipe["pretrian"] = {}
    with pytest.raises(UserError) as e:
        load_recipe(write_recipe(tmp_path, recipe))
    msg = str(e.value)
    assert "tokenizer.vocab_sise: unknown key" in msg
    assert "curate.val_fraction" in msg and "'lots'" in msg
    assert "missing.txt does not exist" in msg and "ingest.sources.0" in msg
    assert "pretrian: unknown key" in msg
    assert "4 problem(s)" in msg


def test_a_stage_needs_its_inputs(tmp_path, small_corpus):
    recipe = small_recipe(small_corpus, tmp_path / "w")
    del recipe["curate"]
    with pytest.raises(UserError, match="tokenizer: needs the curate stage's output"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_overrides_are_typed_and_scoped():
    raw = {"tokenizer": {"vocab_size": 8192}}
    out = apply_overrides(raw, ["tokenizer.vocab_size=4096", "min_frequency=3", "curate.exact_dedup=false"],
                          default_section="tokenizer")
    assert out["tokenizer"] == {"vocab_size": 4096, "min_frequency": 3}
    assert out["curate"] == {"exact_dedup": False}
    assert raw == {"tokenizer": {"vocab_size": 8192}}  # the original is not modified
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides(raw, ["vocab_size"])


def test_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "proj" / "docs").mkdir(parents=True)
    (tmp_path / "proj" / "docs" / "a.md").write_text("# A\n\nSome text.")
    recipe = write_recipe(tmp_path / "proj", {"ingest": {"sources": [{"name": "d", "paths": ["docs/"]}]}})
    r = load_recipe(recipe)
    assert r.workdir == (tmp_path / "proj" / "runs" / "recipe").resolve()
    assert [rel for _, rel in r.stages["ingest"].sources[0].files] == ["docs/a.md"]


# What `slmforge init`'s template sets differently from what the code does without the line, and why.
# Every other value the template writes must equal the code's default (a copy that documents it).
INTENDED = {
    "name": "init names the recipe after its folder (without the line: the recipe file's stem)",
    "workdir": "an init folder holds one project, so its runs go to runs/ (without the line: runs/<name>)",
    "pretrain.snapshots": "keeps 3 snapshots so that evaluate.select can pick one on the dev sets (default 0: "
                          "only the final weights, for callers that do not select)",
    "sft.epochs": "recipes/demo.yaml's value, which made the README's figures on the whole PostgreSQL manual with "
                  "a small specialist trained from scratch, the model the template sets up (Config: 2 epochs)",
    "sft.lr": "recipes/demo.yaml's value for a small specialist trained from scratch, as sft.epochs "
              "(Config: 5e-4)",
    "dpo.lr": "recipes/demo.yaml's value for a small specialist trained from scratch, as sft.epochs "
              "(Config: 5e-5)",
    "evaluate.models": "the template's recipe also makes sft and dpo, so it scores them (default: pretrain, "
                       "the only model stage every recipe with evaluate has)",
    "bench.context": "the template's specialist has a 256-token context (a small model's default): summarization "
                     "documents are cut to fit it (default None: kept whole, for recipes from before the setting)",
    "evaluate.select": "picks the snapshot on the dev sets (needs pretrain.snapshots; default: the final weights)",
    "export.models": "the template's last model, the chat model from dpo (default: the pretrained specialist, "
                     "which every recipe with export has)",
    "export.catalog": "exports go into the project's catalog, which serve reads (default: no catalog)",
    "serve.catalog": "serves the catalog export writes (default: none; models: then lists model folders)",
}
# Keys without a default: the recipe is invalid without them, so there is nothing to compare with.
REQUIRED = {"ingest.sources.0.name", "ingest.sources.0.paths", "plan.hours", "pretrain.minutes"}


def _leaves(raw, validated, prefix=""):
    """The dotted key of every value the YAML sets, inside nested models and lists of models."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    for k, v in items:
        val = validated[k] if isinstance(raw, list) else getattr(validated, k)
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(val, BaseModel):
            yield from _leaves(v, val, key + ".")
        elif isinstance(v, list) and v and all(isinstance(x, BaseModel) for x in val):
            yield from _leaves(v, val, key + ".")
        else:
            yield key


def _value(recipe, key: str):
    """The validated value at a dotted key of a loaded recipe (name and workdir, or inside a section)."""
    first, *rest = key.split(".")
    if not rest:
        return getattr(recipe, first)
    node = {**recipe.stages, **recipe.services}[first]
    for part in rest:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def test_init_template_sets_the_code_defaults_or_says_why_not(tmp_path, monkeypatch):
    """Each value in the template is compared with what the same recipe gets without that line: equal,
    listed in INTENDED (with the reason, which the template's comment gives too), or required."""
    import copy

    from slmforge.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["init", "proj"]) == 0
    folder = tmp_path / "proj"
    (folder / "data" / "notes.md").write_text("# Notes\n\nThe pump must be primed before start.\n")
    template = load_recipe(folder / "recipe.yaml")
    raw = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    sections = {**template.stages, **template.services}
    keys = [k for k in ("name", "workdir") if k in raw]
    keys += [f"{s}.{k}" for s in sections for k in _leaves(raw[s], sections[s])]
    assert len(keys) > 60 and {"sft.epochs", "curate.minhash.n_grams", "serve.router.kind"} <= set(keys)

    differ, required = {}, set()
    for key in keys:
        without = copy.deepcopy(raw)
        *parents, last = key.split(".")
        node = without
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[int(last) if isinstance(node, list) else last]
        variant = folder / "variant.yaml"  # beside the template: the same relative paths
        variant.write_text(yaml.safe_dump(without, sort_keys=False), encoding="utf-8")
        try:
            default = _value(load_recipe(variant), key)
        except UserError:
            required.add(key)
            continue
        if _value(template, key) != default:
            differ[key] = (_value(template, key), default)
    assert required == REQUIRED
    unexplained = {k: v for k, v in differ.items() if k not in INTENDED}
    assert not unexplained, f"template value != code default (make them equal, or add to INTENDED): {unexplained}"
    assert not set(INTENDED) - set(differ), f"listed in INTENDED but equal now: {set(INTENDED) - set(differ)}"
    text = (folder / "recipe.yaml").read_text(encoding="utf-8")
    for key in INTENDED:
        line = _template_line(text, key)
        assert "default" in line.partition("#")[2], f"{key}: the template's comment must name the default: {line!r}"


def _template_line(text: str, key: str) -> str:
    """The template's line that sets `key` (section.leaf): the first one naming the leaf in the section."""
    section, leaf = key.split(".")[0], key.rsplit(".", 1)[-1]
    lines = text.splitlines()
    if "." in key:
        start = lines.index(f"{section}:")
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"[A-Za-z_]", lines[i])), len(lines))
        lines = lines[start + 1:end]
    return next(ln for ln in lines if re.match(rf"\s*(\w+: \{{.*)?\b{leaf}:", ln.partition("#")[0]))


def test_device_is_recipe_wide_overridable_per_stage_and_cuda_without_a_gpu_is_a_clear_error(tmp_path, small_corpus,
                                                                                               monkeypatch):
    import torch

    from slmforge import hardware

    recipe = small_recipe(small_corpus, tmp_path / "w", with_model=True)
    recipe["device"] = "cuda:1"
    recipe["evaluate"]["device"] = "cpu"
    stages = load_recipe(write_recipe(tmp_path, recipe)).stages
    assert stages["evaluate"].device == "cpu" and stages["synth"].device == "cuda:1"  # its own, else the recipe's
    # where a model runs is not part of what a stage makes
    assert "device" not in stages["evaluate"].key_dict() and "device" not in stages["synth"].key_dict()
    recipe["device"] = "gpu"
    with pytest.raises(UserError, match="device: 'gpu'; expected auto, cpu, cuda or cuda:N"):
        load_recipe(write_recipe(tmp_path, recipe))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device("auto") == "cpu" and hardware.resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match=r"evaluate.device: 'cuda', but no GPU is visible .*set evaluate.device: auto"):
        hardware.resolve_device("cuda", "evaluate.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert hardware.resolve_device("auto") == "cuda" and hardware.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(UserError, match="only 1 GPU"):
        hardware.resolve_device("cuda:1")


def test_a_model_loaded_for_evaluate_lands_on_the_configured_device(tmp_path):
    """On a CPU machine the only device to prove it on is the CPU (a GPU run is the device script's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmforge.models.modeling import load_model
    from slmforge.stages.tokenizer import save_hf, train_bpe

    save_hf(train_bpe(iter(["select from a table"] * 20), vocab_size=300, min_frequency=1), tmp_path / "m")
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", device="cpu")
    assert model.device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda|torch not compiled"):
        load_model(tmp_path / "m", device="cuda")  # asked for a GPU this build or machine lacks: no silent CPU


def test_auto_batch_sizes_are_todays_cpu_sizes_on_the_cpu_and_larger_on_a_gpu():
    from slmforge.hardware import auto_batch
    from slmforge.serve.config import Config as ServeConfig
    from slmforge.stages import evaluate

    cfg = evaluate.Config()
    assert (cfg.batch_size, cfg.generation_batch) == ("auto", "auto")
    assert auto_batch(cfg.batch_size, "cpu", 8, 64) == 8 and auto_batch("auto", "cuda:0", 8, 64) == 64
    assert auto_batch(5, "cuda", 8, 64) == 5  # a number is taken as it is
    assert ServeConfig().max_concurrency == "auto" and ServeConfig(max_concurrency=3).max_concurrency == 3
    with pytest.raises(ValueError):
        evaluate.Config(batch_size=0)
    with pytest.raises(ValueError):
        evaluate.Config(generation_batch="big")
