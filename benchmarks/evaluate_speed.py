"""evaluate's wall time for one 135M model, before and after a change, with the scores side by side.

On a demo workdir whose curate and bench stages are done, the evaluate stage scores one model (default:
the base smollm2-135m as it is; bits per byte on the first --max-bytes of each test split, the four
benchmark sets, one greedy sample per source) twice, each in a fresh process with its own empty artifact
store: with the source tree of git revision --before (checked out into a temporary worktree, with its own
copy of the base), then with this checkout's. Both use the same weights dtype (--dtype; default what `evaluate.dtype: auto` picks
here). Prints the wall times, their ratio, and every score of both runs with the largest difference.

    .venv/bin/python benchmarks/evaluate_speed.py --workdir runs/demo --before c83fe91
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = r"""
import json, sys, time
from slmforge.models import bases
from slmforge.artifacts import ArtifactStore
from slmforge.stages import evaluate
args = json.loads(sys.argv[1])
bases.get(args["base"])  # converted before the clock starts (an older tree keeps its own copy)
src = ArtifactStore(args["workdir"])
inputs = {s: src.resolve(f"{s}:latest") for s in ("curate", "bench")}
cfg = evaluate.Config(models=[{"name": args["name"], "base": args["base"]}], dtype=args["dtype"],
                      max_bytes=args["max_bytes"], samples=1, sample_tokens=32)
t0 = time.time()
art = evaluate.run(cfg, ArtifactStore(args["store"]), inputs)
wall = time.time() - t0
m = art.manifest["metrics"]
print("RESULT " + json.dumps({"wall_s": round(wall, 1), "scores": m["scores"][args["name"]],
                              "benchmarks": m["benchmarks"][args["name"]]}))
"""


def one(src: Path, args, store: Path, dtype: str, bases: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), **({"SLMFORGE_BASES": str(bases)} if bases else {})}
    payload = json.dumps({"workdir": str(Path(args.workdir).resolve()), "name": args.name, "base": args.base,
                          "dtype": dtype, "max_bytes": args.max_bytes, "store": str(store)})
    p = subprocess.run([sys.executable, "-c", ONE_RUN, payload], env=env, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"evaluate with {src} failed:\n{p.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def flat(r: dict) -> dict[str, float]:
    out = {f"{s} bits per byte": v["bpb"] for s, v in r["scores"].items()}
    for task, metrics in r["benchmarks"].items():
        out.update({f"{task} {k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a demo workdir with curate and bench done")
    p.add_argument("--before", required=True, help="the git revision to compare with (e.g. the last landed commit)")
    p.add_argument("--name", default="smollm2")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: what dtype auto picks here)")
    p.add_argument("--max-bytes", type=int, default=100_000)
    args = p.parse_args()

    from slmforge.stages.evaluate import weights_dtype

    dtype = args.dtype or weights_dtype("auto")
    with tempfile.TemporaryDirectory(prefix="evaluate-speed-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            before = one(tree / "src", args, Path(tmp) / "store-before", dtype, Path(tmp) / "bases-before")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        after = one(ROOT / "src", args, Path(tmp) / "store-after", dtype)
    a, b = flat(before), flat(after)
    print(f"evaluate of {args.name} ({args.base}), weights {dtype}, {args.max_bytes} bytes per test split, "
          f"four benchmark sets")
    print(f"{'':<44} {'before':>10} {'after':>10}")
    print(f"{'wall time, s':<44} {before['wall_s']:>10.1f} {after['wall_s']:>10.1f}   "
          f"after/before = {after['wall_s'] / before['wall_s']:.2f}")
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        same = "" if va == vb else f"   diff {vb - va:+.4f}" if va is not None and vb is not None else ""
        print(f"{k:<44} {va if va is not None else '-':>10} {vb if vb is not None else '-':>10}{same}")
    print(json.dumps({"before": before, "after": after, "revision": args.before, "dtype": dtype,
                      "command": shlex.join([sys.executable, *sys.argv]), "machine": platform.platform(),
                      "processor": platform.processor()}))


if __name__ == "__main__":
    main()
