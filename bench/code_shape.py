"""The code's shape in figures (issue 12): the largest modules, the import edges between packages that run against
the data flow (a file importing a package counts once), and the repeated blocks of six or more lines. Prints one
JSON object.

The flow, left to right: ``mcie`` (settings, hub, device, geometry, the MLLM layer: what several stages share) ->
``db`` -> ``pipeline`` -> ``annotate`` -> ``exports`` -> ``model``; ``pipeline`` -> ``db`` is the door every stage
writes through. Two counts of file -> package imports (a file importing a package counts once):

- ``against_flow``: a package importing one to its right (downstream);
- ``stage_to_stage``: a stage importing another stage's code, other than ``db`` and the shared ``mcie`` base.

Neither counts the places that wire every stage by design: the command tree (``mcie/cli.py``, each package's
``*cli.py``), the demo generator (``mcie/demo/`` writes the layout ``pipeline/seed_format.py`` reads: a tool like
the command tree) and the app layer's use of later stages (``annotate`` running exports as jobs and the model for
previews). ``exports`` -> ``annotate`` is listed by ``stage_to_stage``: the export reads review aggregation there.

    python bench/code_shape.py [--root .] [--no-duplicates]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("mcie", "db", "pipeline", "annotate", "exports", "model")
RANK = {"mcie": 0, "db": 1, "pipeline": 2, "annotate": 3, "exports": 4, "model": 5}
WIRING = re.compile(r"(^|/)(cli|models_cli|importer_cli|jobs_cli|study_cli|demo)\.py$|^mcie/demo/")
APP_LAYER = {("annotate", "exports"), ("annotate", "model")}


def package_of(module: str) -> str | None:
    """``mcie.db.models`` -> ``db``; ``mcie.config`` -> ``mcie``; anything else None. The bare names of the layout
    before the ``mcie`` namespace (``db.models``) count too, so an old checkout can be measured the same way."""
    parts = module.split(".")
    if parts[0] in RANK and parts[0] != "mcie":
        return parts[0]
    if parts[0] != "mcie":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK and parts[1] != "mcie" else "mcie"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, lazy (in-function) imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def measure(root: Path) -> dict:
    sizes: list[tuple[int, str]] = []
    edges: set[tuple[str, str, str]] = set()
    against: list[str] = []
    across: list[str] = []
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            sizes.append((len(path.read_text(encoding="utf-8").splitlines()), rel))
            for module in imports_of(path):
                target = package_of(module)
                if target is None or target == top:
                    continue
                edges.add((top, target, rel))
                if WIRING.search(rel) or (top, target) in APP_LAYER:
                    continue
                if RANK[target] > RANK[top]:
                    against.append(f"{rel} -> mcie.{target}")
                if top != "mcie" and target not in ("mcie", "db"):
                    across.append(f"{rel} -> mcie.{target}")
    sizes.sort(reverse=True)
    graph: dict[str, list[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, [])
        if target not in graph[source]:
            graph[source].append(target)
    return {
        "modules": len(sizes),
        "largest_modules": [{"lines": n, "path": p} for n, p in sizes[:5]],
        "package_graph": {k: sorted(v, key=RANK.get) for k, v in sorted(graph.items(), key=lambda kv: RANK[kv[0]])},
        "against_flow_edges": len(set(against)),
        "against_flow": sorted(set(against)),
        "stage_to_stage_edges": len(set(across)),
        "stage_to_stage": sorted(set(across)),
    }


def duplicate_pairs(root: Path) -> int | None:
    """Pairs of places sharing 6+ lines, by the library's ``duplicates`` command (None when it is not installed)."""
    if shutil.which("duplicates") is None:
        return None
    out = subprocess.run(["duplicates", "--repo", str(root), "--seconds", "300"], capture_output=True, text=True).stdout
    match = re.match(r"(\d+) pairs", out) or (re.match(r"no duplicates", out) and re.match(r"()", "0"))
    return int(match.group(1) or 0) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--no-duplicates", action="store_true")
    args = parser.parse_args()
    report = measure(args.root)
    report["duplicate_pairs"] = None if args.no_duplicates else duplicate_pairs(args.root)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
