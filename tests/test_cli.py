import subprocess
import sys

import pytest

from slmforge.config import load_recipe
from tests.conftest import slmforge

HEAVY = ("torch", "transformers", "datatrove", "pydantic", "tokenizers")


def test_help_imports_nothing_heavy():
    """`slmforge --help` and `--version` load no heavy library (its speed: benchmarks/cli_startup.py)."""
    for argv in (["--help"], ["--version"]):
        code = (f"import sys\nfrom slmforge.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (argv, out.stdout)
        if argv == ["--help"]:
            assert "init" in out.stdout and "serve" in out.stdout


def test_init_writes_a_recipe_that_loads_and_never_overwrites(tmp_path):
    target = tmp_path / "my-domain"
    r = slmforge("init", str(target))
    assert r.returncode == 0, r.stderr
    text = (target / "recipe.yaml").read_text()
    assert "name: my-domain" in text and "# " in text  # commented
    (target / "data" / "notes.md").write_text("# Notes\n\nThe pump must be primed before start.\n")
    recipe = load_recipe(target / "recipe.yaml")
    assert list(recipe.stages) == ["ingest", "curate", "tokenizer", "plan", "synth", "pretrain", "sft", "dpo",
                                   "bench", "evaluate", "report", "export"]
    assert list(recipe.services) == ["serve"] and recipe.services["serve"].catalog == str(target / "catalog.db")
    (target / "recipe.yaml").write_text("name: mine\n")
    r = slmforge("init", str(target))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (target / "recipe.yaml").read_text() == "name: mine\n"


def test_bad_recipe_exits_2_with_one_message(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\ntokenizer: {vocab_size: many}\ncurate: {}\n")
    r = slmforge("run", str(tmp_path / "r.yaml"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "tokenizer.vocab_size" in r.stderr and "Traceback" not in r.stderr
    assert "curate: needs the ingest stage's output" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = slmforge("status", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = slmforge("--version")
    assert r.returncode == 0 and r.stdout.startswith("slmforge ")


def test_plan_without_a_recipe():
    r = slmforge("plan", "--hours", "24", "--device", "h100", "--n-devices", "8", "--domain-tokens", "1e15")
    assert r.returncode == 0, r.stderr
    assert "1.51B" in r.stdout + r.stderr
    r = slmforge("plan", "--hours", "1", "--flops", "1e18", "--domain-tokens", "1e9")
    assert r.returncode == 2 and "Choose one" in r.stderr


def test_an_unusable_workdir_is_a_clear_error_not_a_traceback(tmp_path):
    from tests.conftest import DATA

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\ningest:\n  sources:\n    - {{name: pg, role: domain, paths: "
                      f"[{DATA / 'postgresql_docs.jsonl.gz'}]}}\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for workdir in (a_file, a_file / "under", "/proc/slmforge-runs"):
        r = slmforge("run", str(recipe), "--set", f"workdir={workdir}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"workdir {workdir}: cannot write" in r.stderr and "--set workdir=DIR" in r.stderr, r.stderr
    assert a_file.read_text() == "not a folder"


def test_a_bad_section_is_reported_once_and_a_duplicate_section_is_an_error(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\ningest: {sources: [{name: a, paths: [a.txt]}]}\ncurate: {}\n"
                                     "tokenizer: {vocab_sise: 4096}\nplan: {}\npretrain: {tokens: 1k}\n")
    r = slmforge("run", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and "tokenizer.vocab_sise: unknown key" in r.stderr
    assert "needs the tokenizer stage's output" not in r.stderr, r.stderr  # the section is there, only wrong
    (tmp_path / "d.yaml").write_text("name: x\ncurate: {}\ntokenizer: {vocab_size: 4096}\ncurate: {workers: 2}\n")
    r = slmforge("run", str(tmp_path / "d.yaml"))
    assert r.returncode == 2 and "`curate` appears twice in one mapping (lines 2 and 4)" in r.stderr, r.stderr


def _ingest_recipe(tmp_path):
    from tests.conftest import write_jsonl, write_recipe

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"Document {i} about VACUUM and indexes."}
                                                 for i in range(3)])
    return write_recipe(tmp_path / "r", {"name": "x", "workdir": str(tmp_path / "w"),
                                         "ingest": {"sources": [{"name": "d", "role": "domain", "paths": [str(docs)]}]}})


def test_recipe_positional_or_flag_force_and_the_path_verb(tmp_path, capsys):
    """Every verb takes RECIPE or --recipe RECIPE; --force is a switch that re-runs what the verb runs;
    `slmforge path STAGE` prints the folder `<stage>/latest` links to."""
    from slmforge.cli import main

    recipe = _ingest_recipe(tmp_path)
    r = slmforge("ingest", str(recipe))
    assert r.returncode == 0 and "▶ ingest" in r.stderr, r.stderr
    r = slmforge("ingest", "--recipe", str(recipe))
    assert r.returncode == 0 and "cached" in r.stderr and "▶ ingest" not in r.stderr, r.stderr
    r = slmforge("ingest", str(recipe), "--recipe", str(recipe), "--force")
    assert r.returncode == 0 and "▶ ingest" in r.stderr, r.stderr
    r = slmforge("run", "--recipe", str(recipe), "--force")  # every stage it runs
    assert r.returncode == 0 and "▶ ingest" in r.stderr and "ran ingest" in r.stderr, r.stderr
    r = slmforge("run", str(recipe), "--force", "ingest")  # the old spelling still works, and says the new one
    assert r.returncode == 0 and "▶ ingest" in r.stderr and "--force-stage ingest" in r.stderr, r.stderr

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    assert cli("status", "--recipe", str(recipe))[0] == 0
    code, _, err = cli("ingest", str(recipe), "--recipe", str(tmp_path / "other.yaml"))
    assert code == 2 and "two recipes given" in err
    code, _, err = cli("ingest")
    assert code == 2 and "needs a recipe: slmforge ingest RECIPE (or --recipe RECIPE)" in err
    code, _, err = cli("run", str(recipe), "--force-stage", "curate")
    assert code == 2 and "stage 'curate' is not in recipe" in err
    [key] = [p.name for p in (tmp_path / "w" / "ingest").iterdir() if p.is_dir() and not p.is_symlink()]
    for where in ([str(recipe)], ["--recipe", str(recipe)], [str(tmp_path / "w")], ["--workdir", str(tmp_path / "w")]):
        code, out, err = cli("path", "ingest", *where)
        assert code == 0 and out.strip() == str(tmp_path / "w" / "ingest" / key), (where, err)
    code, _, err = cli("path", "curate", str(recipe))
    assert code == 2 and "no completed curate run in" in err
    with pytest.raises(SystemExit):
        main(["path", "nope", str(recipe)])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_plan_help_lists_every_flag_and_takes_a_recipe_either_way(tmp_path):
    import argparse

    from slmforge.flags import add_flags
    from slmforge.stages.plan import CliConfig

    out = subprocess.run([sys.executable, "-m", "slmforge.cli", "plan", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0
    no_recipe = add_flags(argparse.ArgumentParser(), CliConfig).values()  # the flags `plan` without a recipe takes
    wanted = ["RECIPE", "--recipe", "--force", "--set", "--json", *(f"--{k.replace('_', '-')}" for k in no_recipe)]
    assert "--domain-tokens" in wanted and "--hours" in wanted
    assert [f for f in wanted if f not in out.stdout] == []
    r = slmforge("plan", str(tmp_path / "missing.yaml"), "--domain-tokens", "1e9")
    assert r.returncode == 2 and "--domain-tokens is for `slmforge plan` without a recipe" in r.stderr
    r = slmforge("plan", "--hours", "1", "--force")
    assert r.returncode == 2 and "need a recipe" in r.stderr


def _tiny_model(folder):
    """A random 1-layer Llama with a byte-level BPE and the chat template, saved as slmforge saves models."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from slmforge.models.chat import BOS, EOS, PAD, SPECIAL_TOKENS, chat_template
    from slmforge.models.modeling import llama_config, shape

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["SELECT * FROM pg_class WHERE relname = 'x';", "VACUUM runs on tables."] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.chat_template = chat_template()
    torch.manual_seed(0)
    cfg = llama_config(shape(1, len(tok), aspect=32, head_dim=16, context=64), len(tok), tok.bos_token_id,
                       tok.eos_token_id, tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_chat_prints_the_prompt_quoted_and_the_answer_on_its_own_lines(tmp_path, capsys, monkeypatch):
    import io

    from slmforge.cli import main
    from slmforge.models.lm import generate
    from slmforge.models.modeling import load_model

    folder = _tiny_model(tmp_path / "m")
    model, tok = load_model(folder)
    two = "two\nlines"
    answer = {p: generate(model, tok, p, 6).lstrip() for p in ("SELECT", "VACUUM", two)}
    assert main(["chat", str(folder), "--prompt", "SELECT", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"> SELECT\n{answer['SELECT']}\n"
    assert main(["chat", str(folder), "--prompt", "two\nlines", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"> two\n> lines\n{answer[two]}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("SELECT\n\nVACUUM\n"))  # one prompt a line; blank lines skipped
    assert main(["chat", str(folder), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"> SELECT\n{answer['SELECT']}\n\n> VACUUM\n{answer['VACUUM']}\n"
