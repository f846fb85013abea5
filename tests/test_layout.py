"""The house's shape (AGENTS.md): stages on top, libraries below, no god modules, short import chains."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600
MAX_FUNCTION = 60  # lines, decorators and docstring included
MAX_FLAT = 12  # modules directly in src/slmforge: the shared core; the rest sit in concern folders
MAX_CHAIN = 5
# Command-line entry points sit on top of everything they dispatch to (lazily): not counted in chains.
ENTRY_POINTS = ("slmforge.cli", "slmforge.serve.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "slmforge").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (annotations only, never imported)."""
    for n in ast.iter_child_nodes(tree):
        if isinstance(n, ast.If) and getattr(n.test, "id", getattr(n.test, "attr", None)) == "TYPE_CHECKING":
            continue
        yield n
        yield from _nodes(n)


def _imports(name: str) -> set[str]:
    """Every slmforge module `name` imports, at the top or inside a function (lazy imports count)."""
    out = set()
    for n in _nodes(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("slmforge"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                out.add(full if full in MODULES else n.module)
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in MODULES}
    out.discard(name)
    if name.startswith("slmforge.stages."):
        out.discard("slmforge.stages")  # the package's name list, not a stage
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_no_stage_imports_another_stage():
    stages = {m for m in MODULES if m.startswith("slmforge.stages.")}
    bad = sorted(f"{m} imports {d}" for m in stages for d in GRAPH[m] if d in stages)
    assert not bad, "stages talk only through the ArtifactStore; move shared code down a level:\n" + "\n".join(bad)


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines): {long}"


def test_no_function_over_60_lines():
    long = []
    for p in MODULES.values():
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([n.lineno, *(d.lineno for d in n.decorator_list)])
                if (size := n.end_lineno - first + 1) > MAX_FUNCTION:
                    long.append(f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({size} lines)")
    assert not long, f"split these functions (at most {MAX_FUNCTION} lines):\n" + "\n".join(long)


def test_the_core_stays_flat_and_small():
    flat = sorted(p.name for p in (SRC / "slmforge").glob("*.py"))
    assert len(flat) <= MAX_FLAT, f"{len(flat)} modules in src/slmforge/ (at most {MAX_FLAT}): move one into its " \
                                  f"concern's folder: {', '.join(flat)}"


def test_argparse_only_in_the_cli():
    allowed = {"slmforge.cli", "slmforge.flags"}
    parsers = sorted(m for m, p in MODULES.items()
                     if m not in allowed and "add_argument(" in p.read_text(encoding="utf-8"))
    assert not parsers, f"argparse belongs to slmforge/cli.py (and flags.py), not: {', '.join(parsers)}"


def test_import_chains_are_short():
    @functools.lru_cache(None)
    def longest(m: str, stack: tuple = ()) -> tuple:
        best = (m,)
        for d in sorted(GRAPH[m] - set(ENTRY_POINTS)):
            if d not in stack and len(p := (m, *longest(d, (*stack, m)))) > len(best):
                best = p
        return best

    chain = max((longest(m) for m in MODULES if m not in ENTRY_POINTS), key=len)
    assert len(chain) <= MAX_CHAIN, f"import chain of {len(chain)} modules: {' -> '.join(chain)}"


def test_the_layout_test_sees_a_stage_import():
    """The checks above read real imports: a stage importing a stage is found."""
    assert "slmforge.records" in GRAPH["slmforge.stages.synth"]
    assert "slmforge.synthetic.synthesis" in GRAPH["slmforge.stages.bench"]
