import subprocess
import sys

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
