"""The command as a user meets it: help for everything, a log line per request, a summary at
shutdown, progress on a terminal only, and what `ls` shows."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import httpx2
from openai import AzureOpenAI, OpenAI
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread, run_proxy_process

from tests.conftest import SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_and_option_has_help() -> None:
    missing = []

    def walk(command: click.Command, path: str) -> None:
        if not (command.help or "").strip():
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{path} {param.opts[0]}")
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "replay-proxy")
    assert missing == []
    assert len(main.commands) >= 12  # the walk reached the commands


def _stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    assert process.stderr is not None
    with process.stderr:
        return process.stderr.read().decode()


def test_one_line_per_request_and_nothing_secret(tmp_path: Path,
                                                 simulator: SimulatorThread) -> None:
    with run_proxy_process("--mode", "record", "--cassettes", str(tmp_path / "cassettes"),
                           "--openai-upstream", simulator.url, "--azure-upstream", simulator.url,
                           "--log-level", "info") as (url, process):
        client = OpenAI(base_url=f"{url}/c/suite/v1", api_key=SECRET_KEY, max_retries=0)
        for _ in range(2):  # recorded, then a hit
            client.chat.completions.create(model="gpt-4o-mini", seed=1,
                                           messages=[{"role": "user", "content": "Hi"}])
        azure = AzureOpenAI(azure_endpoint=url, api_key=SECRET_KEY, api_version="2024-10-21",
                            max_retries=0)
        azure.embeddings.create(model="embed", input="hello")
        # A key in the query string, as some Azure clients send it.
        answer = httpx2.post(f"{url}/openai/deployments/embed/embeddings?api-version=2024-10-21"
                             f"&api-key={SECRET_KEY}", json={"input": "query key"},
                             headers={"api-key": SECRET_KEY})
        assert answer.status_code == 200
        stderr = _stop(process)
    lines = [line for line in stderr.splitlines() if " cassette=" in line]
    assert len(lines) == 4, stderr
    recorded, hit, azure_line, _ = lines
    assert re.search(r"INFO POST /c/suite/v1/chat/completions cassette=suite key=[0-9a-f]{16} "
                     r"recorded status=200 upstream=200 [\d.]+ms$", recorded), recorded
    assert re.search(r"cassette=suite key=[0-9a-f]{16} hit status=200 upstream=- ", hit), hit
    assert "POST /openai/deployments/embed/embeddings cassette=default" in azure_line
    assert SECRET_KEY not in stderr and "api-key" not in stderr and "Bearer" not in stderr
    assert "replay-proxy stopped: 1 hit, 0 misses, 3 recorded, 3 upstream calls" in stderr


def test_json_lines_and_the_misses_at_shutdown(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "cassettes" / "tour", tmp_path / "tour")
    body = {"model": "gpt-4o-mini", "seed": 7,
            "messages": [{"role": "user", "content": "Say goodbye to replay-proxy"}]}
    with run_proxy_process("--mode", "replay", "--cassettes", str(tmp_path), "--log-level",
                           "info", "--log-format", "json") as (url, process):
        miss = httpx2.post(f"{url}/c/tour/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {SECRET_KEY}"})
        assert miss.status_code == 404
        stderr = _stop(process)
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = next(record for record in records if record.get("method"))
    assert access["path"] == "/c/tour/v1/chat/completions"
    assert access["cassette"] == "tour" and access["replay_status"] == "miss"
    assert access["status"] == 404 and access["upstream_status"] is None
    assert len(access["key"]) == 16 and access["level"] == "info" and access["ms"] >= 0
    summary = records[-1]
    assert summary["misses"] == 1 and summary["hits"] == 0
    assert summary["misses_named"][0]["key"] == access["key"]
    assert SECRET_KEY not in stderr

    # At the default level, no line per request, but the summary still names the cassette.
    with run_proxy_process("--mode", "replay", "--cassettes", str(tmp_path)) as (url, process):
        httpx2.post(f"{url}/c/tour/v1/chat/completions", json=body)
        quiet = _stop(process)
    assert " cassette=" not in quiet
    assert "replay-proxy stopped: 0 hits, 1 miss, 0 recorded" in quiet
    assert "1 miss in cassette 'tour'; the last: Replay miss: cassette 'tour'" in quiet


def _stderr_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run replay-proxy with its stderr on a pseudo-terminal; (exit code, what it showed)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "replay_proxy", *args], stdout=subprocess.DEVNULL,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return process.wait(timeout=30), shown.decode(errors="replace")


def test_progress_shows_on_a_terminal_only(tmp_path: Path) -> None:
    source = ROOT / "cassettes"
    code, shown = _stderr_on_a_terminal("export", "--from", str(source), "--to",
                                        f"diskcache:{tmp_path / 'terminal'}")
    assert code == 0
    assert "copying" in shown and "100%" in shown
    piped = subprocess.run([sys.executable, "-m", "replay_proxy", "export", "--from",
                            str(source), "--to", f"diskcache:{tmp_path / 'piped'}"],
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.startswith("copied 4 key(s)")
    code, shown = _stderr_on_a_terminal("export", "--json", "--from", str(source), "--to",
                                        f"diskcache:{tmp_path / 'json'}")
    assert code == 0 and "copying" not in shown


def test_ls_shows_the_provider_and_whether_the_answer_streamed() -> None:
    listed = subprocess.run([sys.executable, "-m", "replay_proxy", "ls", "--cassettes",
                             str(ROOT / "cassettes")], capture_output=True, text=True, timeout=60)
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:6] == ["CASSETTE", "KEY", "PROVIDER", "ROUTE", "MODEL", "STREAM"]
    columns = [row.split()[2:6:3] for row in rows]  # provider, stream
    assert sorted(columns) == [["openai", "no"]] * 3 + [["openai", "yes"]]


def test_scripts_serve_from_another_project_records_into_its_cassettes(
        tmp_path: Path, simulator: SimulatorThread) -> None:
    import socket
    import time

    from replay_proxy.tools.testing import free_port

    port = free_port()
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(("REPLAY_PROXY_", "OPENAI_", "AZURE_OPENAI_"))}
    process = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve"), "--port", str(port),
                                "--mode", "record", "--openai-upstream", simulator.url],
                               cwd=tmp_path, env=environ, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/c/elsewhere/v1", api_key="sk-test",
                        max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", seed=9,
                                       messages=[{"role": "user", "content": "Where am I?"}])
    finally:
        stderr = _stop(process)
    assert "replay-proxy listening" in stderr
    assert len(list((tmp_path / "cassettes" / "elsewhere").glob("*.json"))) == 1
    assert not (ROOT / "cassettes" / "elsewhere").exists()
