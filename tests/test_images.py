"""Static checks of the container images (deploy/Dockerfile, deploy/Dockerfile.cuda, .dockerignore).

No Docker engine runs in the tests: the Dockerfiles are parsed into stages and instructions with a
small parser (line continuations, comments, `FROM IMAGE AS NAME`, global ARG defaults), and
.dockerignore is evaluated with Docker's rules (patterns anchored at the context root, `*` within
one path segment, `**` across segments, a match on a parent directory excludes what is under it,
the last matching pattern wins, `!` re-includes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from metaopt.extras import _canonical
from tests.test_packaging import _declared

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "deploy" / "Dockerfile", "cuda": ROOT / "deploy" / "Dockerfile.cuda"}
LOCK = ROOT / "requirements.lock"
BASE_IMAGE = "python:3.11-slim-bookworm"  # the lock is for CPython 3.11 on Linux x86-64
VENV = "/opt/venv"
BUILD_TOOLS = {"gcc", "g++", "cc", "c++", "clang", "make", "cmake", "build-essential", "autoconf",
               "automake", "libtool", "pkg-config", "python3-dev", "libc6-dev", "rustc", "cargo"}


# --- a small Dockerfile parser -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stage:
    base: str  # the FROM image, global ARG defaults substituted
    name: str | None  # the AS name
    instructions: tuple[tuple[str, str], ...]  # (KEYWORD, arguments), after FROM

    def args(self, keyword: str) -> list[str]:
        return [arguments for kw, arguments in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    """Joins backslash continuations; drops comments and blank lines (also inside continuations)."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"the file ends inside a line continuation: {pending!r}"
    return lines


def _substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), text)


@dataclasses.dataclass(frozen=True)
class Dockerfile:
    global_args: dict[str, str]  # ARG NAME=DEFAULT before the first FROM
    stages: tuple[Stage, ...]


@functools.cache
def _parse(kind: str) -> Dockerfile:
    name = DOCKERFILES[kind].name
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, list]] = []
    for line in _logical_lines(DOCKERFILES[kind].read_text()):
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arguments, re.I)
            assert match, f"{name}: cannot parse FROM {arguments!r}"
            stages.append((_substitute(match[1], global_args), match[2], []))
        elif not stages:
            assert keyword == "ARG", f"{name}: only ARG may precede the first FROM, not {keyword}"
            arg, _, default = arguments.partition("=")
            global_args[arg] = default
        else:
            stages[-1][2].append((keyword, arguments))
    return Dockerfile(global_args, tuple(Stage(base, as_, tuple(body)) for base, as_, body in stages))


def _stages(kind: str) -> tuple[Stage, ...]:
    return _parse(kind).stages


def _builder(kind: str) -> Stage:
    stages = _stages(kind)
    named = [stage for stage in stages[:-1] if stage.name == "builder"]
    assert named, f"{DOCKERFILES[kind].name}: no stage named builder before the final one: {stages}"
    return named[0]


def _apt_packages(run: str) -> set[str]:
    """Packages named in the `apt-get install` (or `apt install`) commands of one RUN."""
    packages: set[str] = set()
    for command in re.split(r"&&|\|\||;|\|", run):
        words = shlex.split(command)
        if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
            after = words[words.index("install") + 1:]
            packages |= {word.split("=")[0] for word in after if not word.startswith("-")}
    return packages


def _copy_sources(copy: str) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of one COPY in shell or JSON form."""
    words = json.loads(copy) if copy.startswith("[") else shlex.split(copy)
    flags = dict(word[2:].partition("=")[::2] for word in words if word.startswith("--"))
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1], paths[-1], flags


# --- a small .dockerignore evaluator -----------------------------------------------------------

def _glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i:end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@functools.cache
def _ignore_rules() -> tuple[tuple[bool, re.Pattern], ...]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, _glob_regex(pattern)))
    return tuple(rules)


def _excluded(path: str) -> bool:
    """Whether Docker leaves PATH (relative to the repository root, `/`-separated) out of the context."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in _ignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def _locked_version(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", LOCK.read_text(), re.M | re.I)
    assert match, f"requirements.lock pins no {name}=="
    return match[1]


# --- the Dockerfiles ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_from_python_311(kind):
    stages = _stages(kind)
    assert len(stages) >= 2, f"{DOCKERFILES[kind].name}: expected a builder and a final stage, got {stages}"
    assert _builder(kind).base == BASE_IMAGE
    assert stages[-1].base == BASE_IMAGE, f"final stage FROM {stages[-1].base}, expected {BASE_IMAGE}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_runs_as_a_numeric_non_root_user(kind):
    users = _stages(kind)[-1].args("USER")
    assert users, f"{DOCKERFILES[kind].name}: the final stage sets no USER, so it runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]!r}: expected a numeric uid other than 0"
    assert int(uid) == 1000, "the Helm chart's securityContext runs as uid 1000"
    runs = " ".join(_stages(kind)[-1].args("RUN"))
    assert re.search(r"useradd\b[^&;]*--uid 1000\b", runs), "no user with uid 1000 is created"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_installs_no_build_tools(kind):
    final = _stages(kind)[-1]
    for run in final.args("RUN"):
        tools = _apt_packages(run) & BUILD_TOOLS
        assert not tools, f"{DOCKERFILES[kind].name}: the final stage installs build tools {sorted(tools)}"
        if _apt_packages(run):
            assert "--no-install-recommends" in run, f"apt-get install without --no-install-recommends: {run}"
        assert not re.search(r"\bpip3? install\b", run), f"pip in the final stage: {run}"
    # KubeRay's default readiness and liveness probes exec `wget` in the Ray container.
    assert any("wget" in _apt_packages(run) for run in final.args("RUN")), "wget (KubeRay probes) missing"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_copies_the_venv_from_the_builder(kind):
    final = _stages(kind)[-1]
    copies = [_copy_sources(copy) for copy in final.args("COPY")]
    assert any(flags.get("from") == "builder" and sources == [VENV] for sources, _, flags in copies), (
        f"{DOCKERFILES[kind].name}: the final stage must COPY --from=builder {VENV}")
    env = " ".join(final.args("ENV"))
    assert re.search(rf"\bPATH={VENV}/bin:", env), f"{VENV}/bin is not first on PATH: {env}"
    # KubeRay runs `ray start` under `bash -lc`; /etc/profile resets PATH, profile.d restores it.
    assert any("/etc/profile.d/" in run and f"{VENV}/bin" in run for run in final.args("RUN")), (
        f"{VENV}/bin is not put on PATH for login shells (/etc/profile.d), so KubeRay finds no `ray`")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_entrypoint_ports_and_environment(kind):
    final = _stages(kind)[-1]
    assert [json.loads(e) for e in final.args("ENTRYPOINT")][-1:] == [["metaopt"]]
    assert [json.loads(c) for c in final.args("CMD")][-1:] == [["--help"]]
    exposed = {port for expose in final.args("EXPOSE") for port in expose.split()}
    assert {"50051", "9090"} <= exposed, f"expected the learner's gRPC 50051 and metrics 9090, got {exposed}"
    env = " ".join(final.args("ENV"))
    for setting in ("PYTHONUNBUFFERED=1", "XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        assert setting in env, f"{DOCKERFILES[kind].name}: final stage ENV lacks {setting}"
    assert final.args("WORKDIR"), "no WORKDIR in the final stage"
    assert any("org.opencontainers.image.title" in label for label in final.args("LABEL"))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_builder_installs_runtime_dependencies_from_the_lock_then_the_project(kind):
    runs = _builder(kind).args("RUN")
    pip_installs = [cmd.strip() for run in runs for cmd in re.split(r"&&|;", run)
                    if re.search(r"\bpip3? install\b", cmd)]
    # The lock also pins pytest, moto, ruff...: as a constraints file it pins versions and adds nothing.
    assert any(re.search(r"(^|\s)-c requirements\.lock\b", cmd) for cmd in pip_installs), pip_installs
    assert not any(re.search(r"(^|\s)-r requirements\.lock\b", cmd) for cmd in pip_installs), (
        "-r requirements.lock would put the development tools into the image")
    project = [cmd for cmd in pip_installs if re.search(r"\s\.$", cmd)]
    assert project, f"the project itself (`pip install ... .`) is not installed: {pip_installs}"
    assert not any(re.search(r"(^|\s)(-e|--editable)\s", cmd) for cmd in project), "editable install"
    assert all("--no-cache-dir" in cmd for cmd in pip_installs), f"pip cache kept: {pip_installs}"



@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_image_gets_the_dependencies_of_the_core_and_of_the_eval_and_service_extras(kind):
    """The builder lists its runtime requirements from pyproject.toml with a python one-liner: run
    it as the image would, and it must name everything the service needs, metaopt itself never."""
    run = next(r for r in _builder(kind).args("RUN") if "runtime-requirements" in r)
    code = re.search(r"python -c '(.*?)'", run, re.S)[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    named = {_canonical(re.match(r"[A-Za-z0-9._-]+", line)[0]) for line in done.stdout.split("\n") if line}
    assert named == _declared("eval", "service"), named ^ _declared("eval", "service")

def test_cuda_image_pins_the_locked_jax():
    jax = _locked_version("jax")
    assert _locked_version("jaxlib") == jax, "requirements.lock pins jax and jaxlib to different versions"
    assert _parse("cuda").global_args.get("JAX_VERSION") == jax, (
        f"deploy/Dockerfile.cuda: ARG JAX_VERSION={_parse('cuda').global_args.get('JAX_VERSION')!r}, "
        f"but requirements.lock has jax=={jax}; set the ARG to {jax}")
    runs = " ".join(_builder("cuda").args("RUN"))
    assert re.search(r"jax\[cuda12\]==\$\{?JAX_VERSION\b", runs), "the builder does not install jax[cuda12]"
    assert "jax[cuda" not in " ".join(_builder("cpu").args("RUN")), "the CPU image installs CUDA jax"


def test_lock_pins_versions_an_index_can_serve():
    # `pip freeze` writes `NAME @ file:///...` for a package installed from a local wheel; no image
    # build (and no fresh `make venv`) can read that file.
    bad = [line for line in LOCK.read_text().splitlines()
           if line.strip() and not line.startswith("#") and not re.fullmatch(r"[A-Za-z0-9._-]+==\S+", line)]
    assert not bad, f"requirements.lock lines that are not NAME==VERSION: {bad}; pin them as NAME==VERSION"


# --- .dockerignore and what the Dockerfiles copy -----------------------------------------------

def test_dockerignore_keeps_local_state_out_of_the_context():
    for path in (".git/HEAD", ".venv/bin/python", "runs/registry/x", "bench-out/r.json", "tests/test_x.py",
                 "metaopt/__pycache__/cli.cpython-311.pyc", "task_zoo/__pycache__/x.pyc",
                 "metaopt.egg-info/PKG-INFO", ".pytest_cache/v", "learner/.env", "certs/server.key"):
        assert _excluded(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "requirements.lock", "README.md", "metaopt/cli.py",
                 "examples/registry/reference/aliases.json"):
        assert not _excluded(path), f".dockerignore leaves {path} out, and the images need it"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_copied_path_exists_and_is_in_the_context(kind):
    for stage in _stages(kind):
        for copy in stage.args("COPY") + stage.args("ADD"):
            sources, _, flags = _copy_sources(copy)
            if "from" in flags:
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{DOCKERFILES[kind].name}: COPY {source}: not in the repository"
                assert not _excluded(source), f"COPY {source}, but .dockerignore excludes it"
                if path.is_dir():  # everything under it arrives, except Python's byte-code caches
                    files = [f.relative_to(ROOT).as_posix() for f in path.rglob("*")
                             if f.is_file() and "__pycache__" not in f.parts]
                    assert files, f"COPY {source}: the directory is empty"
                    dropped = [f for f in files if _excluded(f)]
                    assert not dropped, f"COPY {source}: .dockerignore drops {dropped}"
