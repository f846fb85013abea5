import json
import os
import subprocess
import sys

import pytest

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.errors import UserError
from slmforge.records import read_documents
from slmforge.stages import curate, ingest
from slmforge.stages.curate import split_of
from tests.conftest import write_jsonl, write_recipe

CODE = """Example 7.3. Creating a table

CREATE TABLE parts (
    id      integer PRIMARY KEY,
    name    text NOT NULL,
    due     date
);

name | due
seal | 2024-01-01
"""
DUP = ("Seals wear out faster when the pump runs dry. Check the water level in the tank before every start, "
       "and stop the pump at once when the pressure gauge drops below the red mark. Replace a seal that leaks "
       "more than a few drops a minute; keep two spare seals in the cabinet next to the control panel.")
PII_TEXT = ("Contact the maintainer at jane.doe@corp-mail.com or call (415) 555-2671 when the pump fails. "
            "The server at 8.8.4.4 runs the monitoring job, see Section 55.2.2.1 for the details of the schedule. "
            "The internal host 192.168.1.5 is fine to show. The deploy key is AKIAIOSFODNN7EXAMPLE and the "
            "settings file has api_key = 'abcdef0123456789abcdef' in it. The rest of this page explains how the "
            "service is restarted by the operator on duty, and what the operator checks before and after.")


@pytest.fixture(scope="module")
def curated(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("cur")
    real = [json.loads(line) for line in small_corpus["domain"].read_text().splitlines()]
    long_page = max(real, key=lambda d: len(d["text"]))
    near = dict(long_page, id="near-copy", text=long_page["text"].replace(" the ", " a ", 1))
    docs = real + [
        {"id": "code", "text": CODE + "The table holds the parts and the dates when they are due. Each row is one "
                               "part. Rows are added by the maintenance planner and removed when a part is retired."},
        {"id": "spam", "text": "Buy cheap pumps now at the best price!\n" * 40},
        {"id": "short", "text": "Valves must be checked each morning before the pumps are started by the operator."},
        {"id": "one-sentence", "text": "Every morning the operator on duty checks whether valves, seals, gauges, "
                                       "filters and hoses in both pump rooms show wear, leaks or unusual noise before "
                                       "starting any of the three main pumps"},
        {"id": "lorem", "text": "Lorem ipsum dolor sit amet. The pump room is on the lower deck and has to be kept "
                                "dry. Its door stays locked at night. Only the engineer and the captain have a key."},
        {"id": "pii", "text": PII_TEXT},
        {"id": "dup-a", "text": DUP},
        {"id": "dup-b", "text": DUP},
        near,
    ]
    write_jsonl(tmp / "docs.jsonl", docs)
    recipe = write_recipe(tmp, {"workdir": "w", "ingest": {"sources": [{"name": "d", "paths": ["docs.jsonl"]}]},
                                "curate": {"workers": 1, "audit_sample": 5}})
    cfg = load_recipe(recipe).stages
    store = ArtifactStore(tmp / "w")
    ing = ingest.run(cfg["ingest"], store)
    art = curate.run(cfg["curate"], store, {"ingest": ing})
    out = {d["id"]: d for split in ("train", "val", "test") for d in read_documents(art.path / "data" / split)}
    return art, out, cfg, store, ing


def test_each_filter_drops_what_it_should(curated):
    art, out, *_ = curated
    f = art.manifest["metrics"]["filters"]
    assert f["gopher_repetition"]["by_reason"].get("dup_line_frac") == 1 and "spam" not in out
    # a 14-word page: its n-grams are each a large share of it (repetition), or it is too short (quality)
    assert "short" not in out
    assert f["gopher_repetition"]["dropped"] + f["gopher_quality"]["dropped"] == 2
    assert f["c4"]["by_reason"] == {"too_few_sentences": 1, "lorem_ipsum": 1}
    assert "one-sentence" not in out and "lorem" not in out
    assert f["exact_dedup"]["dropped"] == 1 and ("dup-a" in out) != ("dup-b" in out)
    assert f["minhash"]["dropped"] == 1
    assert art.manifest["metrics"]["docs_in"] == 39
    # the real manual pages all survive
    assert sum(1 for k in out if k.startswith("postgresql_docs:")) >= 29


def test_code_and_tables_survive_byte_for_byte(curated):
    _, out, *_ = curated
    assert out["code"]["text"].startswith(CODE)


def test_pii_is_redacted_and_section_numbers_are_not(curated):
    art, out, *_ = curated
    t = out["pii"]["text"]
    for secret in ("jane.doe@corp-mail.com", "555-2671", "8.8.4.4", "AKIAIOSFODNN7EXAMPLE", "abcdef0123456789abcdef"):
        assert secret not in t
    assert "email@example.com" in t and "192.0.2.1" in t and "<REDACTED_SECRET>" in t and "api_key = '" in t
    assert "Section 55.2.2.1" in t and "192.168.1.5" in t
    assert art.manifest["metrics"]["pii_redacted"] == {"email": 1, "ip": 1, "phone": 1, "secret": 2}


def test_audit_sample_keeps_rejected_documents_with_reasons(curated):
    art, *_ = curated
    rep = [json.loads(line) for line in (art.path / "audit" / "gopher_repetition.jsonl").read_text().splitlines()]
    assert any(r["id"] == "spam" and r["reason"] for r in rep)
    c4 = [json.loads(line) for line in (art.path / "audit" / "c4.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in c4} == {"too_few_sentences", "lorem_ipsum"}


def test_disabling_a_filter_keeps_its_documents(curated, tmp_path):
    _, _, cfg, store, ing = curated
    loose = cfg["curate"].model_copy(update={"c4": curate.C4Rules(enabled=False), "exact_dedup": False,
                                                "minhash": curate.MinHash(enabled=False)})
    art = curate.run(loose, store, {"ingest": ing})
    ids = {d["id"] for s in ("train", "val", "test") for d in read_documents(art.path / "data" / s)}
    assert {"one-sentence", "lorem", "dup-a", "dup-b"} <= ids
    assert "c4" not in art.manifest["metrics"]["filters"] and "minhash" not in art.manifest["metrics"]["filters"]


def test_datatrove_logging_is_quiet_during_curate_and_put_back_after_it_on_success_and_on_error(
        curated, tmp_path, monkeypatch):
    """curate swaps datatrove's add_task_logger and setup_default_logger for quiet ones and quiets loguru's
    console while its jobs run; afterwards (the fixture's run) and after a failing job, datatrove's own
    functions are back and loguru's console shows INFO again."""
    import io

    import datatrove.executor.base as dt_base
    import datatrove.utils.logging as dt_logging
    from loguru import logger

    from slmforge import curation

    def datatroves_own():
        return (dt_base.add_task_logger is dt_logging.add_task_logger
                and dt_logging.setup_default_logger.__module__ == "datatrove.utils.logging")

    assert datatroves_own()  # after the fixture's curate
    _, _, cfg, _, ing = curated
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    seen = []

    def failing_job(jobs, logs, workers):
        seen.append(datatroves_own())
        logger.info("inside curate")
        raise RuntimeError("a datatrove job failed")

    monkeypatch.setattr(curation, "run_local", failing_job)
    other = cfg["curate"].model_copy(update={"audit_sample": 3})  # another key: the fixture's run stays
    with pytest.raises(RuntimeError, match="a datatrove job failed"):
        curate.run(other, ArtifactStore(tmp_path / "w"), {"ingest": ing})
    assert seen == [False] and datatroves_own()
    logger.info("after curate")
    assert "inside curate" not in stderr.getvalue() and "after curate" in stderr.getvalue()
    monkeypatch.undo()
    dt_logging.setup_default_logger()  # loguru's console on the real stderr again


def test_quality_settings_keep_reference_pages_and_drop_short_or_symbol_soup(small_corpus):
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    tuned = GopherQualityFilter(**curate.Config().gopher_quality.kwargs())
    web = GopherQualityFilter()
    assert tuned.filter(Document(text="Check the valves and the seals.", id="s")) == (False, "gopher_short_doc")
    soup = " ".join(["|", "(", "1024", "2048", ")", "->", "the", "and", "1.5e10", "0x7fff", "4096"] * 40)
    assert tuned.filter(Document(text=soup, id="x")) == (False, "gopher_below_alpha_threshold")
    pages = [json.loads(line)["text"] for line in small_corpus["domain"].read_text().splitlines()]
    kept_tuned = sum(tuned.filter(Document(text=t, id=str(i))) is True for i, t in enumerate(pages))
    kept_web = sum(web.filter(Document(text=t, id=str(i))) is True for i, t in enumerate(pages))
    assert kept_tuned == len(pages) and kept_web < kept_tuned


def test_split_is_deterministic_and_by_id(curated):
    art, out, *_ = curated
    # pinned: the same split in every process and on every machine (a salted hash() would differ per run)
    pinned = {"doc-0": "train", "doc-1": "train", "doc-2": "test", "doc-3": "train", "doc-4": "val",
              "doc-5": "test", "doc-6": "val", "doc-7": "train", "doc-8": "train", "doc-9": "train"}
    assert {i: split_of(i, 0.1, 0.2) for i in pinned} == pinned
    code = "from slmforge.curation import split_of; print(','.join(split_of(f'doc-{i}', 0.1, 0.2) for i in range(10)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "1"}).stdout.strip()
    assert other.split(",") == list(pinned.values())
    placed = {d["id"]: s for s in ("train", "val", "test") for d in read_documents(art.path / "data" / s)}
    assert all(split_of(i, 0.05, 0.05) == s for i, s in placed.items())
    shares = [split_of(f"doc-{i}", 0.1, 0.2) for i in range(5000)]
    assert abs(shares.count("val") / 5000 - 0.1) < 0.02 and abs(shares.count("test") / 5000 - 0.2) < 0.02


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def test_sigkill_mid_curate_leaves_no_orphan_and_a_restart_finishes(curated, tmp_path):
    """datatrove's manager and workers die with a killed curate, and the next run completes unaided."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    art, _, cfg, store, ing = curated
    folder = cfg["ingest"].sources[0].files[0][0].parent  # the fixture's recipe, with two workers
    recipe = folder / f"recipe-{tmp_path.name}.yaml"
    recipe.write_text((folder / "recipe.yaml").read_text().replace("workers: 1", "workers: 2"))
    work = tmp_path / "w"
    shutil.copytree(store.workdir / "ingest", work / "ingest", symlinks=True)
    args = [sys.executable, "-m", "slmforge.cli", "curate", "--recipe", str(recipe), "--set", f"workdir={work}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.01)
    kids = _children(proc.pid)
    assert kids, "curate finished before it forked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    alive = kids
    for _ in range(100):  # the kernel kills them with their parent; allow a moment for the signal
        alive = [k for k in kids if os.path.exists(f"/proc/{k}") and
                 open(f"/proc/{k}/stat").read().split(")")[1].split()[0] != "Z"]
        if not alive:
            break
        time.sleep(0.05)
    try:
        assert not alive, f"orphans of the killed curate still run: {alive}"
    finally:
        for k in alive:
            os.kill(k, signal.SIGKILL)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [done] = [p for p in (work / "curate").iterdir()
              if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial")]
    ids = sorted(d["id"] for s in ("train", "val", "test") for d in read_documents(done / "data" / s))
    want = sorted(d["id"] for s in ("train", "val", "test") for d in read_documents(art.path / "data" / s))
    assert ids == want


def _executor_recipe(small_corpus, tmp_path, **curate_keys):
    """The small corpus (2 sources: 2 tasks per step) with 2 MinHash buckets (2 tasks) and 2 workers."""
    from tests.conftest import small_recipe

    recipe = small_recipe(small_corpus, tmp_path / "w")
    recipe["curate"].update({"workers": 2, "minhash": {"num_buckets": 2}, **curate_keys})
    return load_recipe(write_recipe(tmp_path, recipe)).stages


def _rows(art) -> dict:
    """Every output file's rows, by path under data/."""
    import pyarrow.parquet as pq

    return {str(p.relative_to(art.path / "data")): pq.read_table(p).to_pylist()
            for p in sorted((art.path / "data").glob("*/*/*.parquet"))}


@pytest.mark.slow
def test_curate_on_a_local_ray_instance_gives_the_local_executors_output(small_corpus, tmp_path):
    ray = pytest.importorskip("ray")
    # MinHash off: Ray starts an actor per task (~2.5 s each here), and the Slurm tests cover every step
    cfg = _executor_recipe(small_corpus, tmp_path, minhash={"enabled": False})
    local_store, ray_store = ArtifactStore(tmp_path / "local"), ArtifactStore(tmp_path / "ray")
    local = curate.run(cfg["curate"], local_store, {"ingest": ingest.run(cfg["ingest"], local_store)})
    on_ray = cfg["curate"].model_copy(update={"executor": "ray"})
    art = curate.run(on_ray, ray_store, {"ingest": ingest.run(cfg["ingest"], ray_store)})
    assert not ray.is_initialized()  # the instance curate started is shut down
    assert art.key == local.key  # where it ran is not part of the cache key
    logs = art.path / "work" / "logs"
    ray_ex = json.loads((logs / "1-filter" / "executor.json").read_text())  # datatrove's record of its executor
    local_ex = json.loads((local.path / "work" / "logs" / "1-filter" / "executor.json").read_text())
    assert "mem_per_cpu_gb" in ray_ex and "start_method" not in ray_ex and "start_method" in local_ex
    rows = _rows(art)
    assert len(rows) >= 4 and rows == _rows(local)
    for key in ("filters", "splits", "pii_redacted", "docs_in"):
        assert art.manifest["metrics"][key] == local.manifest["metrics"][key], key
    assert (art.path / "audit").is_dir() and sorted(p.name for p in (art.path / "audit").iterdir()) == \
        sorted(p.name for p in (local.path / "audit").iterdir())


def test_slurm_job_scripts_are_written_without_submitting(small_corpus, tmp_path):
    """submit: false writes datatrove's sbatch scripts for every step, chained by afterok dependencies,
    and a pickled pipeline that a Slurm task would run (run here for the filter step's task 0)."""
    import os
    import subprocess
    import sys

    cfg = _executor_recipe(small_corpus, tmp_path, executor="slurm", slurm={
        "partition": "cpu", "time": "1:30:00", "cpus_per_task": 2, "qos": "high", "sbatch_args": {"account": "p1"},
        "env_command": "source /shared/venv/bin/activate", "submit": False})
    store = ArtifactStore(tmp_path / "w")
    ing = ingest.run(cfg["ingest"], store)
    with pytest.raises(UserError, match="curate.slurm.submit is false: nothing was submitted") as e:
        curate.run(cfg["curate"], store, {"ingest": ing})
    [partial] = (tmp_path / "w" / "curate").glob("*.partial")
    logs = partial / "work" / "logs"
    steps = ["1-filter", "2-exact-find", "3-minhash-signatures", "4-minhash-buckets", "5-minhash-cluster", "6-split"]
    assert sorted(p.name for p in logs.iterdir()) == steps
    assert str(logs / "1-filter" / "launch_script.slurm") in str(e.value)
    record = json.loads((partial / "work" / "slurm_jobs.json").read_text())
    assert record["submitted"] == [] and len(record["written"]) == 2 * len(steps)  # each step + its stats merge
    arrays = [r for r in record["written"] if "launch_pickled_pipeline" in r["script"]]
    tasks = [2, 1, 2, 2, 1, 2]  # 2 sources, 1 exact-dedup finder, 2 MinHash buckets, 1 clusterer
    for i, (step, r, n) in enumerate(zip(steps, arrays, tasks)):
        script = (logs / step / "launch_script.slurm").read_text()
        assert script == r["script"]
        for line in ("#SBATCH --partition=cpu", "#SBATCH --time=1:30:00", "#SBATCH --cpus-per-task=2",
                     "#SBATCH --qos=high", "#SBATCH --account=p1", f"#SBATCH --job-name=slmforge-curate-{step}",
                     f"#SBATCH --array=0-{n - 1}%2", "source /shared/venv/bin/activate",
                     f"launch_pickled_pipeline {logs / step / 'executor.pik'}"):
            assert line in script, (step, line)
        previous = arrays[i - 1]["job_id"] if i else None
        assert (f"--dependency=afterok:{previous}" in r["sbatch_args"]) == bool(previous), (step, r["sbatch_args"])
        assert json.loads((logs / step / "ranks_to_run.json").read_text()) == list(range(n))
    # what a Slurm task runs: the pickled filter step, as array task 0 on node1 (datatrove asks Slurm's
    # scontrol to expand the node list, here a one-line stand-in)
    bin_dir = os.path.dirname(sys.executable)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (fake / "scontrol").chmod(0o755)
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="0", SLURM_NODELIST="node1", PATH=f"{fake}:{os.environ['PATH']}")
    r = subprocess.run([os.path.join(bin_dir, "launch_pickled_pipeline"), str(logs / "1-filter" / "executor.pik")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (logs / "1-filter" / "completions" / "00000").is_file()
    assert list((partial / "work" / "filtered").glob("*.parquet"))


SBATCH = '''#!{python}
"""sbatch, as a stand-in for a Slurm cluster: runs every task of the job array at once, in order (the
jobs arrive in dependency order), the way a compute node would run the script."""
import os, re, subprocess, sys
script = sys.argv[-1]
m = re.search(r"--array=0-(\\d+)", open(script).read())
ids = os.path.join(os.path.dirname(sys.argv[0]), "ids")
job_id = str(len(open(ids).read().split()) + 1 if os.path.exists(ids) else 1)
open(ids, "a").write(job_id + "\\n")
for i in range(int(m.group(1)) + 1 if m else 1):
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), SLURM_NODELIST="node1", SLURM_JOB_ID=job_id)
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
print("Submitted batch job " + job_id)
'''
SRUN = '''#!{python}
"""srun -l -n 1 CMD...: runs CMD."""
import subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args = args[2:] if args[0] == "-n" else args[1:]
sys.exit(subprocess.run(args).returncode)
'''


def test_curate_submitted_to_slurm_waits_for_the_jobs_and_gives_the_local_output(small_corpus, tmp_path, monkeypatch):
    """The submit path end to end, with sbatch/srun/squeue/scontrol as stand-ins that run each job's
    script on this machine: datatrove's scripts, pickled pipelines and stats merge, then curate's wait."""
    import os
    import sys

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("squeue", "#!/bin/sh\n"),
                       ("scontrol", "#!/bin/sh\necho node1\n")):
        (fake / name).write_text(text.replace("{python}", sys.executable))
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    keys = {"exact_dedup": False, "minhash": {"enabled": False}}
    cfg = _executor_recipe(small_corpus, tmp_path, **keys)
    local_store, slurm_store = ArtifactStore(tmp_path / "local"), ArtifactStore(tmp_path / "slurm")
    local = curate.run(cfg["curate"], local_store, {"ingest": ingest.run(cfg["ingest"], local_store)})
    on_slurm = cfg["curate"].model_copy(update={"executor": "slurm", "slurm": curate.Slurm(partition="cpu", poll_s=1)})
    art = curate.run(on_slurm, slurm_store, {"ingest": ingest.run(cfg["ingest"], slurm_store)})
    assert (fake / "ids").read_text().split() == ["1", "2", "3", "4"]  # filter, its stats merge, split, its merge
    record = json.loads((art.path / "work" / "slurm_jobs.json").read_text())
    assert [r["job_id"] for r in record["submitted"]] == ["1", "2", "3", "4"]
    assert "--dependency=afterok:1" in record["submitted"][2]["sbatch_args"]
    assert _rows(art) == _rows(local) and len(_rows(art)) >= 4
    for key in ("filters", "splits", "pii_redacted"):
        assert art.manifest["metrics"][key] == local.manifest["metrics"][key], key
