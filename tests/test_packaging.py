"""The package as a user gets it: built into an sdist and a wheel, installed into a fresh venv
outside this repository, and used from a project of the user's own that has a `proxy/`
package too. Green tests inside the repository have hidden broken installs before.

The build and the venv are made once per session (pytest-xdist workers share them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from replay_proxy.tools.testing import free_port

from tests.conftest import exclusive

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)  # the first test builds and installs


@dataclass(frozen=True)
class Installed:
    dist: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def package(self) -> Path:
        found = list(self.venv.glob("lib/python*/site-packages/replay_proxy"))
        assert len(found) == 1, found
        return found[0]


def _source_tree(target: Path) -> None:
    """This checkout's files as git sees them (committed or not, minus what it ignores), so
    that nothing is built inside the repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the files of this checkout")
    # The session's own temporary folder, which pytest-xdist's workers share.
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) \
        / "replay-proxy-package"
    with exclusive(shared.with_suffix(".lock")):
        done = Installed(shared / "dist", shared / "venv")
        if (shared / "ready").exists():
            return done
        shutil.rmtree(shared, ignore_errors=True)
        source = shared / "source"
        source.mkdir(parents=True)
        _source_tree(source)
        _run(sys.executable, "-m", "build", "--outdir", done.dist, source, cwd=shared)
        _run(sys.executable, "-m", "venv", done.venv, cwd=shared)
        wheel = next(done.dist.glob("*.whl"))
        _run(done.bin / "python", "-m", "pip", "install", "--disable-pip-version-check",
             "--quiet", wheel, "openai", "pytest", cwd=shared)
        (shared / "ready").touch()
        return done


def _user_environment(installed: Installed, **extra: str) -> dict[str, str]:
    removed = ("PYTHONPATH", "VIRTUAL_ENV", "CI", "PYTEST_ADDOPTS")
    environ = {name: value for name, value in os.environ.items()
               if name not in removed and not name.startswith(("OPENAI_", "AZURE_OPENAI_",
                                                               "REPLAY_PROXY_", "PYTEST_XDIST"))}
    environ["PATH"] = f"{installed.bin}{os.pathsep}{environ.get('PATH', '')}"
    return {**environ, **extra}


def test_sdist_and_wheel_pass_twine_and_carry_the_license(installed: Installed) -> None:
    [sdist] = installed.dist.glob("*.tar.gz")
    [wheel] = installed.dist.glob("*.whl")
    assert sdist.name == "replay_proxy-0.1.0.tar.gz"
    _run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=installed.dist)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("replay_proxy-0.1.0.dist-info/METADATA").decode()
        entry_points = archive.read("replay_proxy-0.1.0.dist-info/entry_points.txt").decode()
    assert not [name for name in names if name.split("/")[0] == "proxy"]  # no `proxy` module
    assert "replay_proxy/py.typed" in names
    assert "replay_proxy-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Framework :: Pytest" in metadata and "Project-URL: " in metadata
    assert "replay-proxy = replay_proxy.tools.cli:main" in entry_points
    assert "replay_proxy = replay_proxy.tools.pytest_plugin" in entry_points


@pytest.fixture
def untouched(installed: Installed) -> Iterator[None]:
    """Nothing the user does writes into the installed package or into this repository."""

    def package_files() -> dict[str, int]:
        return {str(path): path.stat().st_mtime_ns for path in installed.package.rglob("*")}

    def repository_status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout

    package, repository = package_files(), repository_status()
    yield
    assert package_files() == package
    assert repository_status() == repository


USER_PACKAGE = 'NAME = "the user\'s own proxy package"\n'
USER_TEST = '''
import pytest
from openai import OpenAI

import proxy  # the user's own package: replay_proxy's name cannot collide with it


@pytest.mark.replay
def test_summary():
    reply = OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", seed=4, messages=[{"role": "user", "content": proxy.NAME}])
    assert reply.choices[0].message.content
'''
USER_SCRIPT = '''
from openai import OpenAI

reply = OpenAI(max_retries=0).chat.completions.create(
    model="gpt-4o-mini", seed=5, messages=[{"role": "user", "content": "From a script"}])
print(reply.choices[0].message.content)
'''


@pytest.mark.usefixtures("untouched")
def test_a_user_project_records_and_replays_with_the_installed_package(
        installed: Installed, tmp_path: Path) -> None:
    project = tmp_path / "user-project"
    (project / "proxy").mkdir(parents=True)
    (project / "proxy" / "__init__.py").write_text(USER_PACKAGE)
    (project / "tests").mkdir()
    (project / "tests" / "test_app.py").write_text(USER_TEST)
    (project / "app.py").write_text(USER_SCRIPT)
    (project / "pyproject.toml").write_text('[project]\nname = "user-app"\n'
                                            '[tool.pytest.ini_options]\npythonpath = ["."]\n')
    python, cli = installed.bin / "python", installed.bin / "replay-proxy"
    environ = _user_environment(installed)

    assert _run(cli, "--help", cwd=project, env=environ).stdout.startswith("Usage: replay-proxy")
    assert "0.1.0" in _run(cli, "--version", cwd=project, env=environ).stdout
    located = _run(python, "-c", "import replay_proxy; print(replay_proxy.__file__)",
                   cwd=tmp_path, env=environ).stdout
    assert located.startswith(str(installed.venv))
    assert subprocess.run([python, "-c", "import proxy"], cwd=tmp_path, env=environ,
                          capture_output=True).returncode != 0  # no `proxy` module installed

    port = free_port()
    simulator = subprocess.Popen([cli, "simulate", "--port", str(port)], cwd=project,
                                 env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        upstream = f"http://127.0.0.1:{port}"
        _run(python, "-c", f"import time, urllib.request as u\nfor _ in range(200):\n"
             f"    try: u.urlopen('{upstream}/_sim/state'); break\n"
             f"    except OSError: time.sleep(0.05)", cwd=project, env=environ)
        recording = dict(environ, OPENAI_API_KEY="sk-user-recording")
        recorded = _run(python, "-m", "pytest", "-p", "no:cacheprovider", "--replay-mode",
                        "record", "--replay-openai-upstream", upstream, cwd=project,
                        env=recording)
        assert "1 recording(s) made" in recorded.stdout
        ran = _run(cli, "run", "--mode", "record", "--openai-upstream", upstream, "--",
                   python, "app.py", cwd=project, env=recording)
        assert "1 recorded" in ran.stderr
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)
        assert simulator.stderr is not None
        simulator.stderr.close()
    assert len(list((project / "cassettes" / "tests" / "test_app" / "test_summary")
                    .glob("*.json"))) == 1
    assert len(list((project / "cassettes" / "default").glob("*.json"))) == 1

    # Offline, no key: CI=true replays.
    offline = dict(environ, CI="true")
    replayed = _run(python, "-m", "pytest", "-p", "no:cacheprovider", cwd=project, env=offline)
    assert "1 hit(s), 0 miss(es), 0 recording(s) made, 0 upstream call(s)" in replayed.stdout
    again = _run(cli, "run", "--", python, "app.py", cwd=project, env=offline)
    assert again.stdout == ran.stdout and "1 hit, 0 misses" in again.stderr
