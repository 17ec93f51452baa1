"""A misconfigured command says so and exits 2, instead of serving nothing but misses or
reporting an empty store: a cassette folder that does not exist, a mistyped kind of store, a
cassette that is not there, a port another replay-proxy already serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import SECRET_KEY, recorded_files

ROOT = Path(__file__).resolve().parents[2]


def _replay_proxy(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 30) -> tuple[int | None, str]:
    """`replay-proxy ARGS` as a user runs it: (exit code, stderr); None for a command still
    running after `timeout` (it and its workers are stopped then)."""
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith("REPLAY_PROXY_") and name != "CI"}
    process = subprocess.Popen([sys.executable, "-m", "replay_proxy", *args],
                               env={**environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        return None, stderr.decode()
    return process.returncode, stderr.decode()


def test_replaying_from_a_folder_that_does_not_exist_does_not_start(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    for command in (["serve", "--mode", "replay"], ["run", "--mode", "replay"]):
        tail = ["--", sys.executable, "-c", "pass"] if command[0] == "run" else []
        code, stderr = _replay_proxy(*command, "--port", "0", "--cassettes", str(missing),
                                     *tail)
        assert code == 2, stderr
        assert f"--cassettes {missing} does not exist" in stderr and "miss" in stderr
    # --mode auto replays on CI.
    code, stderr = _replay_proxy("serve", "--cassettes", str(missing), env={"CI": "true"})
    assert code == 2 and "does not exist" in stderr
    code, stderr = _replay_proxy("serve", "--mode", "replay", "--store",
                                 f"diskcache:{missing}")
    assert code == 2 and f"--store {missing} does not exist" in stderr
    assert not missing.exists()  # not even created by looking


def test_recording_into_a_new_folder_creates_it(tmp_path: Path,
                                                simulator: SimulatorThread) -> None:
    new = tmp_path / "new" / "cassettes"
    with run_proxy_process("--mode", "record", "--cassettes", str(new),
                           "--openai-upstream", simulator.url) as (url, _):
        with OpenAI(base_url=url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
            client.embeddings.create(model="text-embedding-3-small", input="new folder")
    assert len(recorded_files(new)) == 1


def test_a_file_is_no_cassette_folder(tmp_path: Path) -> None:
    afile = tmp_path / "cassettes"
    afile.write_text("not a folder")
    code, stderr = _replay_proxy("serve", "--mode", "record", "--cassettes", str(afile))
    assert code == 2 and "is a file, not a folder of cassettes" in stderr


@pytest.mark.parametrize("command", [
    ["ls"], ["drift"], ["verify"], ["stats"], ["prune", "--dry-run"], ["compact", "--dry-run"],
    ["show", "7b0334c7"], ["pin", "7b0334c7", "--fingerprint", "fp_x"],
])
def test_inspecting_a_folder_that_does_not_exist_fails(command: list[str],
                                                        tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(main, [*command, "--cassettes", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"--cassettes {missing}: no such folder" in result.output
    assert not missing.exists()


def test_a_store_of_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    typo = f"diskcahce:{tmp_path / 'cache'}"
    code, stderr = _replay_proxy("serve", "--mode", "record", "--store", typo)
    assert code == 2 and "Unknown kind of store 'diskcahce:'" in stderr
    for command in (["ls", "--store", typo], ["export", "--to", typo],
                    ["import", "--from", typo], ["compact", "--store", typo]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, (command, result.output)
        assert "Unknown kind of store 'diskcahce:'" in result.output
    assert list(tmp_path.iterdir()) == []
    assert not Path("diskcahce:" + str(tmp_path / "cache")).exists()


def test_a_cassette_that_is_not_there_is_named(tmp_path: Path) -> None:
    for command in (["ls"], ["drift"], ["compact"], ["verify"]):
        result = CliRunner().invoke(main, [*command, "--cassettes", str(ROOT / "cassettes"),
                                           "--cassette", "tuor"])
        assert result.exit_code == 2, (command, result.output)
        assert "No cassette 'tuor' in directory" in result.output


def test_only_the_workers_of_one_serve_share_a_port(tmp_path: Path,
                                                    simulator: SimulatorThread) -> None:
    recording = tmp_path / "recording"
    with run_proxy_process("--mode", "replay", "--workers", "2", "--cassettes",
                           str(ROOT / "cassettes")) as (url, _):
        port = url.rsplit(":", 1)[1]
        for workers in ("2", "1"):  # a record proxy must not take part of the traffic
            code, stderr = _replay_proxy("serve", "--port", port, "--workers", workers,
                                         "--mode", "record", "--cassettes", str(recording),
                                         "--openai-upstream", simulator.url)
            assert code == 2, stderr
            assert f"127.0.0.1:{port} is already in use" in stderr
        with OpenAI(base_url=url + "/c/tour/v1", api_key="sk-replay", max_retries=0) as client:
            for _ in range(10):  # every request still reaches the replay proxy's workers
                client.chat.completions.create(
                    model="gpt-4o-mini", seed=42,
                    messages=[{"role": "user", "content": "Say hello to replay-proxy"}])
    assert simulator.state.calls == 0 and not recording.exists()
    code, stderr = _replay_proxy("serve", "--port", "0", "--workers", "2")
    assert code == 2 and "--workers shares one port" in stderr
