"""Startup time of the CLI: `slmforge --help` (the thin verb table, which must stay instant: AGENTS.md
rule 11) and a stage verb's `--help` (which may import that stage's Config), each in a fresh process,
as a user types them. Prints the median, minimum and maximum wall time over --runs runs and one JSON
line. tests/test_cli.py checks what `--help` imports; the speed is measured here, not in the tests.

    .venv/bin/python benchmarks/cli_startup.py                 # 10 runs of each
    .venv/bin/python benchmarks/cli_startup.py --runs 30 --verb sft
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], runs: int, label: str) -> dict:
    """Wall seconds of `cmd` in a fresh process, over `runs` runs (after one warm-up run, so that the
    file cache holds the modules)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - t0)
    return {"command": label, "runs": runs, "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3), "max_s": round(max(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--verb", default="tokenizer", help="the stage verb whose --help is timed")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "slmforge.cli"]
    rows = [timed([sys.executable, "-c", "pass"], args.runs, "python -c pass"),  # the interpreter alone
            timed([*cli, "--help"], args.runs, "slmforge --help"),
            timed([*cli, args.verb, "--help"], args.runs, f"slmforge {args.verb} --help")]
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}")
    for r in rows:
        print(f"{r['command']:<28} {r['median_s']:>9} {r['min_s']:>7} {r['max_s']:>7}")
    print(json.dumps({"startup": rows,
                      "command": " ".join([os.path.relpath(sys.executable, REPO), *sys.argv]),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
