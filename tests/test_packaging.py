"""The built wheel installs one namespace, ``mcie``: the stage folders (db/, pipeline/, annotate/, exports/, model/)
map to ``mcie.db``, ``mcie.pipeline``, ... through pyproject's ``package-dir``, and nothing else lands at the top of
site-packages. The installed copy (not the repository) must import every module and migrate a database.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
STAGES = ("db", "pipeline", "annotate", "exports", "model")

# Run by the installed copy from an empty folder: import every module, then report what was imported from where.
PROBE = """
import importlib, json, pkgutil, sys
import mcie
skipped = ("mcie.db.migrations",)  # Alembic's env.py runs only inside Alembic
names = [m.name for m in pkgutil.walk_packages(mcie.__path__, "mcie.") if not m.name.startswith(skipped)]
for name in names:
    importlib.import_module(name)
from mcie.db import migrate
url = "sqlite:///" + sys.argv[1]
migrate.upgrade(url)
print(json.dumps({
    "modules": names,
    "top": sorted({k.split(".")[0] for k in sys.modules}),
    "files": {k: getattr(m, "__file__", None) for k, m in sys.modules.items() if k == "mcie" or k.startswith("mcie.")},
    "revision": migrate.current(url), "head": migrate.head(),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of what the build reads (setuptools writes build/ and *.egg-info beside the sources, and a stale
    # build/lib of the checkout would leak deleted modules into the wheel).
    source = tmp_path_factory.mktemp("source")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for folder in sorted(set(pyproject["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    # No build isolation: the venv's setuptools (the dev extra pins >= 77) builds it offline.
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("mcie-*.whl")
    return built


@pytest.mark.slow
def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"mcie"}, f"the wheel puts {sorted(top - {'mcie'})} at the top of site-packages"
    for stage in STAGES:
        assert f"mcie/{stage}/__init__.py" in names, f"mcie.{stage} is missing from the wheel"
    # Files that are not modules travel as package data.
    assert "mcie/db/migrations/env.py" in names and "mcie/db/migrations/script.py.mako" in names
    assert any(name.startswith("mcie/db/migrations/versions/0001_") for name in names)
    assert {"mcie/annotate/static/review.js", "mcie/annotate/static/study.css"} <= set(names)
    # every module of the checkout is in the wheel (a subpackage missing from pyproject's list would be left out)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
        for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(expected - set(names))
    assert not missing, f"modules of the checkout missing from the wheel (pyproject's packages list): {missing}"


@pytest.mark.slow
def test_installed_wheel_imports_every_module_from_the_namespace(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--quiet", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert installed == ["mcie"], f"pip install put {installed} into site-packages"
    empty = tmp_path / "cwd"
    empty.mkdir()
    # PYTHONPATH puts the installed copy ahead of the editable install of the checkout (a finder after the path).
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "probe.db")],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {f"mcie.{stage}" for stage in STAGES} <= set(report["modules"])
    leaked = sorted(set(STAGES) & set(report["top"]))
    assert not leaked, f"modules imported under a top-level name instead of mcie.*: {leaked}"
    outside = {k: f for k, f in report["files"].items() if f and not f.startswith(str(site))}
    assert not outside, f"imported from outside the installed wheel: {outside}"
    assert report["revision"] == report["head"]
