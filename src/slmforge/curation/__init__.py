"""Curate's datatrove jobs on an executor: local (forked worker processes), Ray or Slurm.

A job is one datatrove pipeline run over `tasks` ranks (curate has up to six: filter, exact-dedup find,
MinHash signatures, buckets, clusters, split). Whatever the executor, job N starts after job N-1 has
finished, and each writes datatrove's usual layout under `logs/<job>/` (completions/, stats/, logs/,
stats.json), so curate reads the same files afterwards and the output does not depend on where it ran.

- local: datatrove's LocalPipelineExecutor, `workers` forked processes.
- ray: RayPipelineExecutor on a running cluster (`address`) or on a Ray instance started here with
  `workers` CPUs; `workers` tasks at once. The steps travel by cloudpickle, by import path for ours
  (slmforge.curation.steps), so every Ray node needs the same slmforge installed and the workdir on a
  shared filesystem.
- slurm: SlurmPipelineExecutor; one job array per job, each depending (afterok) on the one before,
  submitted with `sbatch` from here, then waited for (squeue). Datatrove writes each job's sbatch
  script to `logs/<job>/launch_script.slurm` and the pickled pipeline next to it. With `submit: false`
  the scripts are written and nothing is submitted. The submitted ids are kept in `slurm_jobs.json`, so
  a curate restarted while its jobs run waits for them instead of submitting them twice.
Tasks that completed are skipped when a failed run is started again (datatrove's completions).
While the jobs run (`quiet_datatrove`), datatrove's console logging is at ERROR; its full task logs are
under `logs/<job>/logs/`, and its own logging is put back afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from slmforge.artifacts import write_json_atomic
from slmforge.console import info, progress
from slmforge.errors import UserError


def split_of(doc_id: str, val_fraction: float, test_fraction: float, salt: str = "slmforge") -> str:
    """Deterministic split of one document: the same id always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()[:8], "big") / 2**64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


def quiet_logger() -> None:
    """loguru's console at ERROR, for datatrove's INFO lines (they swamp our progress bars)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="ERROR", format="{level}: {message}")


def _quiet_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
    """datatrove's task logger, with the console at ERROR; the full DEBUG log still goes to
    logs/task_NNNNN.log."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(sys.stderr, level="ERROR", format="{level}: {message}")
    logger.add(logfile, level="DEBUG")
    return logfile


@contextlib.contextmanager
def quiet_datatrove():
    """datatrove's console logging at ERROR while the block runs, in this process and in the workers it
    forks. datatrove sets loguru up through two module functions: add_task_logger (each task) and
    setup_default_logger (at import and after each task); both are swapped for the quiet ones above, and
    put back when the block ends or raises, with loguru's console as datatrove's default again (the
    state its import and each task's end leave)."""
    import datatrove.executor.base as dt_base
    import datatrove.utils.logging as dt_logging

    saved = dt_base.add_task_logger, dt_logging.setup_default_logger
    dt_base.add_task_logger, dt_logging.setup_default_logger = _quiet_task_logger, quiet_logger
    quiet_logger()
    try:
        yield
    finally:
        dt_base.add_task_logger, dt_logging.setup_default_logger = saved
        dt_logging.setup_default_logger()


@dataclass
class Job:
    name: str
    pipeline: list
    tasks: int


def done_tasks(folder: Path) -> int:
    """Tasks of a job that completed (datatrove's completion markers)."""
    return len(list((folder / "completions").glob("*"))) if (folder / "completions").is_dir() else 0


@contextlib.contextmanager
def polling(update, every: float):
    """Call `update()` every `every` seconds in a thread while the block runs, and once after it."""
    stop = threading.Event()

    def poll():
        while not stop.wait(every):
            update()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        update()


@contextlib.contextmanager
def watch(job: Job, folder: Path, where: str):
    """A progress bar of the job's completed tasks, polled from its completion markers."""
    with progress(f"curate · {job.name} on {where}", job.tasks, "tasks", completed=done_tasks(folder)) as bar:
        with polling(lambda: bar.update(completed=done_tasks(folder)), 1.0):
            yield


def _incomplete(job: Job, folder: Path, where: str) -> None:
    n = done_tasks(folder)
    if n < job.tasks:
        raise UserError(f"curate · {job.name}: {job.tasks - n} of {job.tasks} {where} tasks failed; datatrove's logs "
                        f"are in {folder / 'logs'}. Run curate again to retry them (completed tasks are kept).")


def run_local(jobs: list[Job], logs: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor

    from slmforge.curation.children import die_with_parent

    for job in jobs:
        info(f"  curate · {job.name}")
        # fork: workers inherit the quiet logger and the progress counters, and skip re-importing spacy
        with die_with_parent():  # no orphaned manager or worker outlives a killed curate
            LocalPipelineExecutor(job.pipeline, tasks=job.tasks, workers=min(workers, job.tasks), start_method="fork",
                                  logging_dir=str(logs / job.name)).run()


def run_ray(jobs: list[Job], logs: Path, workers: int, cfg) -> None:
    """`cfg`: curate's ray section (address, cpus_per_task, mem_per_cpu_gb)."""
    import ray
    from datatrove.executor.ray import RayPipelineExecutor

    started = not ray.is_initialized()
    if started:
        where = cfg.address or f"a local Ray instance with {workers} CPUs"
        info(f"  curate · connecting to {where}")
        try:
            # workers' output stays in datatrove's task logs: Ray would print every worker's lines here
            ray.init(address=cfg.address, num_cpus=None if cfg.address else workers * cfg.cpus_per_task,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"curate.ray.address: cannot reach the Ray cluster {cfg.address!r} ({e}). Start it "
                            f"(`ray start --head`) or give its address (ray://HOST:10001, or auto)") from e
    try:
        for job in jobs:
            folder = logs / job.name
            ex = RayPipelineExecutor(job.pipeline, tasks=job.tasks, workers=min(workers, job.tasks),
                                     logging_dir=str(folder), cpus_per_task=cfg.cpus_per_task,
                                     mem_per_cpu_gb=cfg.mem_per_cpu_gb)
            with watch(job, folder, "Ray"):
                ex.run()
            _incomplete(job, folder, "Ray")
    finally:
        if started:
            ray.shutdown()


def _default_env_command() -> str:
    """Activate the virtual environment this process runs in (datatrove's `launch_pickled_pipeline` and
    `merge_stats` commands live in its bin/), when it is one."""
    return f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else ""


def _slurm_logs(cfg, folder: Path, job: Job) -> Path:
    """Where Slurm writes a job's own logs: cfg.logs/<job>, or beside datatrove's."""
    return Path(cfg.logs) / job.name if cfg.logs else folder / "slurm_logs"


def _slurm_chain(jobs: list[Job], logs: Path, workers: int, cfg):
    """The jobs as SlurmPipelineExecutors, each depending on the one before; returns the last one, whose
    run() launches the whole chain."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    previous = None
    for job in jobs:
        folder = logs / job.name
        previous = SlurmPipelineExecutor(
            job.pipeline, tasks=job.tasks, workers=workers, time=cfg.time, partition=cfg.partition,
            cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb, qos=cfg.qos,
            job_name=f"{cfg.job_name}-{job.name}", env_command=cfg.env_command or _default_env_command(),
            sbatch_args=dict(cfg.sbatch_args), logging_dir=str(folder), depends=previous,
            slurm_logs_folder=str(_slurm_logs(cfg, folder, job)), mail_type=cfg.mail_type, mail_user=cfg.mail_user)
    return previous


@contextlib.contextmanager
def _recording_sbatch(submit: bool, record: list):
    """datatrove submits through datatrove.executor.slurm.launch_slurm_job (sbatch); within this block each
    call is recorded (script, sbatch arguments, job id), and with submit=False nothing is submitted."""
    import datatrove.executor.slurm as dt_slurm

    original = dt_slurm.launch_slurm_job

    def launch(contents: str, retriever, *args) -> str:
        job_id = original(contents, retriever, *args) if submit else f"not-submitted-{len(record) + 1}"
        record.append({"job_id": str(job_id), "sbatch_args": list(args), "script": contents})
        return job_id

    dt_slurm.launch_slurm_job = launch
    try:
        yield
    finally:
        dt_slurm.launch_slurm_job = original


def _queued(ids: set[str]) -> set[str]:
    """Which of the job ids squeue still lists (pending or running; array tasks as ID_N)."""
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", os.environ.get("USER", "")], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"curate.executor: slurm: squeue failed ({e}); run curate where Slurm's commands work") from e
    return {line.strip().split("_")[0] for line in out.splitlines()} & ids


def run_slurm(jobs: list[Job], logs: Path, workers: int, cfg, record_file: Path) -> None:
    """Submit every job (or only write the scripts), then wait until the last one's stats are merged."""
    if all((logs / j.name / "stats.json").is_file() for j in jobs):
        return
    pending: set[str] = set()
    if record_file.is_file():  # a curate restarted while its jobs run: wait for those, do not submit again
        pending = _queued({r["job_id"] for r in json.loads(record_file.read_text())["submitted"]}) if cfg.submit else set()
    if not pending:
        record: list[dict] = []
        with _recording_sbatch(cfg.submit, record):
            _slurm_chain(jobs, logs, workers, cfg).run()
        write_json_atomic(record_file, {"submitted": record if cfg.submit else [], "written": record})
        if not cfg.submit:
            scripts = ", ".join(str(logs / j.name / "launch_script.slurm") for j in jobs)
            raise UserError(f"curate.slurm.submit is false: nothing was submitted. The job scripts are {scripts}; "
                            f"their sbatch arguments (dependencies) are in {record_file}. Set curate.slurm.submit: "
                            "true to submit them.")
        pending = {r["job_id"] for r in record}
        info(f"  curate · submitted {len(record)} Slurm jobs: {', '.join(sorted(pending))}")
    for job in jobs:
        folder = logs / job.name
        with watch(job, folder, "Slurm"):
            while not (folder / "stats.json").is_file():
                if not _queued(pending):
                    time.sleep(5)  # a job that just ended may still be writing its stats
                    if (folder / "stats.json").is_file():
                        break
                    _incomplete(job, folder, "Slurm")
                    raise UserError(f"curate · {job.name}: the Slurm jobs ended before its statistics were merged; "
                                    f"see {_slurm_logs(cfg, folder, job)}. Run curate again to resubmit.")
                time.sleep(cfg.poll_s)
