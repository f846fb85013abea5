from pathlib import Path

import pytest

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
