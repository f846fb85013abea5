"""Walk a recipe's stages in order: each runs (or is found cached) and hands its artifact on."""

from __future__ import annotations

import time
from dataclasses import dataclass

from slmforge.artifacts import Artifact, ArtifactStore
from slmforge.config import Recipe, stage_inputs, stage_module
from slmforge.console import console, info
from slmforge.errors import UserError


@dataclass
class StageState:
    stage: str
    key: str
    state: str  # done | incomplete | not run
    wall_time_s: float | None


def stage_states(recipe: Recipe) -> list[StageState]:
    """Every stage's cache key and state, computed from the recipe alone (nothing runs)."""
    store = ArtifactStore(recipe.workdir)
    keys: dict[str, str] = {}
    out = []
    for stage, cfg in recipe.stages.items():
        mod = stage_module(stage)
        ext = mod.external(cfg) if hasattr(mod, "external") else None
        key = store.key(stage, cfg.key_dict(), {d: keys[d] for d in stage_inputs(stage, cfg)}, ext)
        keys[stage] = key
        state = store.state(stage, key)
        wall = store.load(stage, key).manifest.get("wall_time_s") if state == "done" else None
        out.append(StageState(stage, key, state, wall))
    return out


def run_recipe(recipe: Recipe, until: str | None = None, only: str | None = None,
               force: tuple[str, ...] = ()) -> dict[str, Artifact]:
    """Run the recipe's stages in order, up to `until` (inclusive); `only` runs one stage, running
    the stages it needs first if they are not cached. `force` re-runs the named stages, and then every
    later stage that reads one of them (a forced stage keeps its key, so theirs would not change)."""
    names = list(recipe.stages)
    if not names:
        raise UserError(f"recipe {recipe.path} has no stage to run, only {', '.join(recipe.services)} "
                        f"(start it with `slmforge serve --recipe {recipe.path}`)")
    for name in (until, only, *force):
        if name is not None and name not in names:
            raise UserError(f"stage {name!r} is not in recipe {recipe.path} (it has: {', '.join(names)})")
    last = only or until or names[-1]
    wanted = names[: names.index(last) + 1]
    if only:
        needed = {only}
        for stage in reversed(wanted):
            if stage in needed:
                needed.update(stage_inputs(stage, recipe.stages[stage]))
        wanted = [s for s in wanted if s in needed]

    store = ArtifactStore(recipe.workdir)
    artifacts: dict[str, Artifact] = {}
    ran = []
    started = time.time()
    forced: set[str] = set()  # stages rebuilt under the key they had: what reads them must rebuild too
    for stage in wanted:
        mod = stage_module(stage)
        inputs = {d: artifacts[d] for d in stage_inputs(stage, recipe.stages[stage])}
        again = stage in force or bool(forced & set(inputs))
        art = mod.run(recipe.stages[stage], store, inputs=inputs, force=again)
        artifacts[stage] = art
        if store.last_built == (stage, art.key):
            ran.append(stage)
            if again:
                forced.add(stage)
    if ran:
        info(f"[bold green]done[/]: ran {', '.join(ran)} in {time.time() - started:.1f}s; outputs in {recipe.workdir}")
    else:
        info(f"[bold green]nothing to do[/]: all {len(wanted)} stage(s) are up to date ({recipe.workdir})")
    if "report" in artifacts:
        print(f"report: {artifacts['report'].path / 'report.html'}")
    return artifacts


def print_status(recipe: Recipe) -> None:
    from rich.table import Table

    table = Table(title=f"{recipe.name}  ({recipe.workdir})")
    for col in ("stage", "state", "key", "wall time"):
        table.add_column(col)
    colors = {"done": "green", "incomplete": "yellow", "not run": "dim"}
    for p in stage_states(recipe):
        wall = f"{p.wall_time_s:.1f}s" if p.wall_time_s is not None else ""
        table.add_row(p.stage, f"[{colors[p.state]}]{p.state}[/]", p.key, wall)
    console.print(table)
