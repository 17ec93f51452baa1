"""`replay-proxy run -- COMMAND`: a Python and a Node application recorded, then replayed offline.

The applications are real programs using the real SDKs (openai for Python, the openai npm
package for Node), started by `run` as child processes; the upstream is the simulator, stopped
before replaying.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import exclusive, stored_bytes

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = Path(__file__).resolve().parent / "node"
NODE_CACHE = ROOT / ".cache" / "node-client"
RECORD_KEY = "sk-run-TESTSECRETrecordingKey0123456789"
AZURE_KEY = "azure-run-TESTSECRETkey0123456789"

PYTHON_CLIENT = '''
import sys
from openai import AzureOpenAI, OpenAI

prompt = sys.argv[1]
client = OpenAI(max_retries=0)
reply = client.chat.completions.create(
    model="gpt-4o-mini", seed=7, messages=[{"role": "user", "content": prompt}])
print("chat:", reply.choices[0].message.content)
stream = client.chat.completions.create(
    model="gpt-4o-mini", seed=7, stream=True, messages=[{"role": "user", "content": prompt}])
print("stream:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
azure = AzureOpenAI(api_version="2024-10-21", max_retries=0)
embedding = azure.embeddings.create(model="embed", input=prompt)
print("azure embedding:", ",".join(str(x) for x in embedding.data[0].embedding[:3]))
if sys.argv[2:] == ["--swallow-a-miss"]:
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", seed=8, messages=[{"role": "user", "content": "never recorded"}])
    except Exception as error:  # the application gets on with it: run must not
        print("swallowed:", error.status_code)
'''


def clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would point a client elsewhere."""
    removed = ("OPENAI_", "AZURE_OPENAI_", "REPLAY_PROXY_")
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(removed) and name != "CI"}
    return {**environ, **extra}


def replay_proxy_run(*args: str, cwd: Path, env: dict[str, str]
                     ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replay_proxy", "run", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node client, with the openai npm package installed once into .cache/node-client."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH; the Node client test needs Node.js 20+")
    manifest = (NODE_CLIENT / "package.json").read_bytes()
    with exclusive(NODE_CACHE.parent / "node-client.lock"):
        stamp = NODE_CACHE / ".installed"
        if not stamp.exists() or stamp.read_bytes() != manifest:
            shutil.rmtree(NODE_CACHE, ignore_errors=True)
            NODE_CACHE.mkdir(parents=True)
            (NODE_CACHE / "package.json").write_bytes(manifest)
            installed = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts",
                 "--loglevel=error"], cwd=NODE_CACHE, capture_output=True, text=True,
                timeout=600)
            if installed.returncode != 0:
                pytest.fail(f"npm install of the openai package failed:\n{installed.stderr}")
            stamp.write_bytes(manifest)
        shutil.copy(NODE_CLIENT / "client.mjs", NODE_CACHE / "client.mjs")
    return NODE_CACHE / "client.mjs"


@pytest.fixture
def python_client(tmp_path: Path) -> Path:
    script = tmp_path / "app" / "client.py"
    script.parent.mkdir()
    script.write_text(PYTHON_CLIENT)
    return script


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project with its (empty) cassettes folder: replay mode refuses to start without one."""
    folder = tmp_path / "project"
    (folder / "cassettes").mkdir(parents=True)
    yield folder


def _client_command(request: pytest.FixtureRequest, language: str) -> list[str]:
    if language == "node":
        return [shutil.which("node") or "node", str(request.getfixturevalue("node_client"))]
    return [sys.executable, str(request.getfixturevalue("python_client"))]


@pytest.mark.parametrize("language", ["python", "node"])
def test_record_then_replay_offline(request: pytest.FixtureRequest, language: str,
                                    project: Path, simulator: SimulatorThread) -> None:
    client = _client_command(request, language)
    prompt = f"Name a moon of Mars ({language})."
    recorded = replay_proxy_run(
        "--mode", "record", "--openai-upstream", simulator.url, "--azure-upstream",
        simulator.url, "--", *client, prompt, cwd=project,
        env=clean_environment(OPENAI_API_KEY=RECORD_KEY, AZURE_OPENAI_API_KEY=AZURE_KEY))
    assert recorded.returncode == 0, recorded.stderr
    assert "chat: " in recorded.stdout and "azure embedding: " in recorded.stdout
    assert ("(mode record, store cassettes): 0 hits, 0 misses, 3 recorded, 3 upstream calls, "
            "0 store errors") in recorded.stderr
    assert simulator.state.calls == 3
    cassette = project / "cassettes" / "default"
    assert len(list(cassette.glob("*.json"))) == 3
    assert RECORD_KEY.encode() not in stored_bytes(project / "cassettes")
    assert AZURE_KEY.encode() not in stored_bytes(project / "cassettes")

    simulator.stop()  # offline from here on, and no key: run sets dummy ones
    replayed = replay_proxy_run("--mode", "replay", "--", *client, prompt, cwd=project,
                                env=clean_environment())
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == recorded.stdout
    assert "3 hits, 0 misses, 0 recorded, 0 upstream calls, 0 store errors" in replayed.stderr


@pytest.mark.parametrize("language", ["python", "node"])
def test_a_swallowed_miss_fails_the_run_and_is_named(request: pytest.FixtureRequest,
                                                     language: str, project: Path,
                                                     simulator: SimulatorThread) -> None:
    client = _client_command(request, language)
    prompt = "Say hello."
    record = replay_proxy_run(
        "--mode", "record", "--openai-upstream", simulator.url, "--azure-upstream",
        simulator.url, "--", *client, prompt, cwd=project,
        env=clean_environment(OPENAI_API_KEY=RECORD_KEY, AZURE_OPENAI_API_KEY=AZURE_KEY))
    assert record.returncode == 0, record.stderr
    simulator.stop()

    # CI=true and --mode auto (the default): replay, as in a CI job.
    swallowed = replay_proxy_run("--", *client, prompt, "--swallow-a-miss", cwd=project,
                                 env=clean_environment(CI="true"))
    assert "swallowed: 404" in swallowed.stdout  # the application carried on and exited 0 ...
    assert swallowed.returncode == 1, swallowed.stderr  # ... but the run fails
    assert "3 hits, 1 miss, 0 recorded" in swallowed.stderr
    assert re.search(r"miss: POST /v1/chat/completions \(cassette default, key [0-9a-f]{16}\)",
                     swallowed.stderr), swallowed.stderr
    assert "the command passed, but the run had 1 miss" in swallowed.stderr
    assert "--allow-misses" in swallowed.stderr

    allowed = replay_proxy_run("--allow-misses", "--", *client, prompt, "--swallow-a-miss",
                               cwd=project, env=clean_environment(CI="true"))
    assert allowed.returncode == 0, allowed.stderr
    assert "1 miss" in allowed.stderr


def test_exit_codes_are_the_commands(project: Path) -> None:
    environ = clean_environment(CI="true")
    failed = replay_proxy_run("--", sys.executable, "-c", "raise SystemExit(3)", cwd=project,
                              env=environ)
    assert failed.returncode == 3
    assert "0 hits, 0 misses" in failed.stderr
    missing = replay_proxy_run("--", "no-such-command-here", cwd=project, env=environ)
    assert missing.returncode == 127
    assert "command not found: no-such-command-here" in missing.stderr
    usage = replay_proxy_run("--mode", "bogus", "--", "true", cwd=project, env=environ)
    assert usage.returncode == 2 and "'bogus' is not one of" in usage.stderr
    nothing = replay_proxy_run(cwd=project, env=environ)
    assert nothing.returncode == 2 and "Missing argument 'COMMAND...'" in nothing.stderr


def test_what_the_command_sees(project: Path) -> None:
    show = ("import os; print(' '.join(os.environ.get(n, '-') for n in ('OPENAI_BASE_URL', "
            "'AZURE_OPENAI_ENDPOINT', 'OPENAI_API_KEY', 'AZURE_OPENAI_API_KEY', 'NO_PROXY')))")
    replaying = replay_proxy_run("--mode", "replay", "--", sys.executable, "-c", show,
                                 cwd=project,
                                 env=clean_environment(HTTP_PROXY="http://127.0.0.1:9"))
    base_url, endpoint, openai_key, azure_key, no_proxy = replaying.stdout.split()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
    assert endpoint == base_url.removesuffix("/v1")
    assert openai_key == azure_key == "sk-replay-proxy-dummy"
    assert "127.0.0.1" in no_proxy.split(",")  # a machine's HTTP proxy is bypassed
    # Recording keeps the user's own key; two runs side by side get two ports.
    recording = replay_proxy_run("--mode", "record", "--", sys.executable, "-c", show,
                                 cwd=project, env=clean_environment(OPENAI_API_KEY="sk-mine"))
    assert recording.stdout.split()[2] == "sk-mine"
    assert recording.stdout.split()[0] != base_url


def test_run_counts_stale_recordings(python_client: Path, project: Path,
                                     simulator: SimulatorThread) -> None:
    import orjson

    recorded = replay_proxy_run(
        "--mode", "record", "--openai-upstream", simulator.url, "--azure-upstream",
        simulator.url, "--", sys.executable, str(python_client), "Stale?", cwd=project,
        env=clean_environment(OPENAI_API_KEY=RECORD_KEY, AZURE_OPENAI_API_KEY=AZURE_KEY))
    assert recorded.returncode == 0, recorded.stderr
    for path in (project / "cassettes" / "default").glob("*.json"):
        document = orjson.loads(path.read_bytes())
        for recording in document["recordings"]:
            recording["recorded_at"] = "2024-06-01T00:00:00.000Z"
        path.write_bytes(orjson.dumps(document))
    simulator.stop()
    replayed = replay_proxy_run("--mode", "replay", "--max-age", "90d", "--", sys.executable,
                                str(python_client), "Stale?", cwd=project,
                                env=clean_environment())
    assert replayed.returncode == 0, replayed.stderr
    assert "3 hits, 0 misses" in replayed.stderr
    assert "3 stale recordings replayed (older than --max-age" in replayed.stderr


SWALLOWING_CLIENT = '''
from openai import OpenAI

try:
    OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": "hi"}])
except Exception as error:  # the application carries on
    print("swallowed:", error.status_code)
'''


def test_an_error_of_the_proxys_own_that_the_command_swallowed_fails_the_run(
        project: Path) -> None:
    """Recording with the upstream out of reach: the client got a 502 from the proxy, not an
    answer, and nothing was recorded. The command exits 0; the run does not."""
    from replay_proxy.tools.testing import free_port

    (project / "swallow.py").write_text(SWALLOWING_CLIENT)
    result = replay_proxy_run(
        "--mode", "record", "--openai-upstream", f"http://127.0.0.1:{free_port()}", "--",
        sys.executable, "swallow.py", cwd=project,
        env=clean_environment(OPENAI_API_KEY=RECORD_KEY))
    assert "swallowed: 502" in result.stdout
    assert result.returncode == 1, result.stderr
    assert "0 recorded, 0 upstream calls, 0 store errors, 1 proxy error" in result.stderr
    assert "the command passed, but the run had 1 proxy error" in result.stderr
    assert not list((project / "cassettes").glob("*/*.json"))  # no cassette was written
