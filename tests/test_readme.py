"""The README's examples work as written: the tour against the committed example cassette, the
`run` examples through bash, the configuration example, the install and CI lines."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx2
import orjson
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.cli import main
from replay_proxy.tools.configuration import checked_defaults, find_config, serve_parameters
from replay_proxy.tools.testing import free_port, run_proxy

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8787"


def _tour_requests() -> list[tuple[str, str, str | None]]:
    """(method, url, body) of every curl command in the tour, in order."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A one-minute tour, offline")[1].split("\n## ")[0]
    commands = re.findall(r"^curl .*?(?<!\\)$", tour.replace("\\\n", " "), flags=re.M | re.S)
    requests = []
    for command in commands:
        words = shlex.split(command, comments=True)
        body = words[words.index("-d") + 1] if "-d" in words else None
        method = words[words.index("-X") + 1] if "-X" in words else "POST" if body else "GET"
        requests.append((method, next(w for w in words if w.startswith("http")), body))
    return requests


def test_tour_shows_a_hit_a_stream_a_miss_and_a_polled_job() -> None:
    requests = _tour_requests()
    readme = (ROOT / "README.md").read_text()
    with run_proxy(Settings(cassettes=ROOT / "cassettes", mode=Mode.REPLAY,
                            openai_upstream="http://127.0.0.1:9")) as proxy:

        def run(method: str, url: str, body: str | None) -> httpx2.Response:
            return httpx2.request(method, url.replace(README_URL, proxy.url), content=body,
                                  headers={"Content-Type": "application/json"} if body else {})

        responses = [run(*request) for request in requests]
        again = run(*requests[3])  # after the reset, the tour runs again
    hit, stream, miss, created, *polls, reset = responses
    assert hit.headers["x-replay-status"] == "hit" and hit.json()["object"] == "chat.completion"
    assert stream.headers["x-replay-status"] == "hit"
    assert stream.text.endswith("data: [DONE]\n\n")
    assert miss.status_code == 404
    message = miss.json()["error"]["message"]
    shown = readme.split("The miss says:")[1].split("```")[1].strip()
    for line in shown.splitlines():
        assert line.strip(" .").removesuffix("...") in message.replace("\n", " ")

    assert created.json()["status"] == "queued" and created.json()["background"] is True
    comments = [command.split("#")[1] for command in re.findall(
        r"^curl -si .*$", readme.split("## A one-minute tour, offline")[1], flags=re.M)]
    for poll, comment in zip(polls, comments, strict=True):
        status, sequence = re.match(r" (\w+) \((?:X-Replay-Sequence: )?(\d+/\d+)\)",
                                    comment).groups()  # type: ignore[union-attr]
        assert poll.json()["status"] == status and poll.headers["x-replay-sequence"] == sequence
        assert poll.json()["id"] == created.json()["id"]
    assert reset.json()["reset"] is True
    assert again.status_code == 200 and again.json() == created.json()


def _section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"\n{title}\n")[1].split("\n## ")[0]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def test_the_run_examples_work_as_written(tmp_path: Path) -> None:
    """The "Try it here" commands, run by bash from the repository's root as a reader would."""
    replay, swallowed, record = _blocks(_section("### Try it here"), "bash")
    port = str(free_port())
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(("OPENAI_", "AZURE_OPENAI_", "REPLAY_PROXY_"))
               and name != "CI"}
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=environ, text=True,
                              capture_output=True, timeout=120)

    hit = bash(replay)
    assert hit.returncode == 0, hit.stderr
    tour = next((ROOT / "cassettes" / "tour").glob("chat.completions-7b0334c7*.json"))
    answer = orjson.loads(tour.read_bytes())["recordings"][0]["body"]
    assert hit.stdout.strip() == answer["choices"][0]["message"]["content"]
    assert "1 hit, 0 misses" in hit.stderr

    miss = bash(swallowed)
    assert "the application carried on\nexit code 1" in miss.stdout
    assert "miss: POST /v1/chat/completions (cassette tour, key " in miss.stderr
    assert swallowed.splitlines()[-1].split("# ")[1].split(",")[0] in miss.stdout

    cassettes = tmp_path / "replay-try"
    recorded = bash(record.replace("8788", port).replace("/tmp/replay-try", str(cassettes)))
    assert recorded.returncode == 0, recorded.stderr
    assert "1 recorded, 1 upstream call" in recorded.stderr
    assert len(list((cassettes / "default").glob("embeddings-*.json"))) == 1


def test_the_configuration_example_is_valid(tmp_path: Path) -> None:
    [example] = _blocks(_section("## Configuration"), "toml")
    (tmp_path / "pyproject.toml").write_text(example)
    (tmp_path / "deeper").mkdir()
    config = find_config(tmp_path / "deeper")
    assert config is not None and config.values["mode"] == "auto"
    defaults = checked_defaults(serve_parameters(), config.values, config.where, tmp_path)
    assert defaults["cassettes"] == str(tmp_path / "tests" / "cassettes")


def test_the_install_lines_and_ci_examples_use_what_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = _section("## Quick start, in your own project")
    assert 'pip install "replay-proxy @ git+https://github.com/OWNER/replay-proxy"' in quick
    assert "pip install -e . replay-proxy" not in readme  # the line that never installed
    workflows = _blocks(_section("## CI"), "yaml")
    assert len(workflows) == 2
    for workflow in workflows:
        assert "replay-proxy @ git+https://github.com/OWNER/replay-proxy" in workflow
        assert "replay-proxy run -- " in workflow
    # The commands the README names exist, with the options it names.
    for command in ("run", "serve", "simulate", "ls", "export", "import", "verify", "probe"):
        assert command in main.commands
    run_options = {option for param in main.commands["run"].params for option in param.opts}
    assert {"--allow-misses", "--mode", "--cassettes", "--cassette", "--openai-upstream",
            "--log-level", "--log-format"} <= run_options


def test_the_matching_rule_examples_parse_as_written(tmp_path: Path) -> None:
    from replay_proxy.tools.cli import main
    from replay_proxy.tools.configuration import (
        cassette_rules_from,
        default_maps,
        read_config,
        settings_from,
    )

    section = _section("## When your prompts change every run")
    commands = re.findall(r"^replay-proxy serve (.*)$", section, flags=re.M)
    assert len(commands) == 4
    serve = main.commands["serve"]
    for command in commands:
        context = serve.make_context("serve", shlex.split(command, comments=True))
        policy = settings_from(context.params).key_policy
        assert policy.rules, command
    toml = section.split("```toml")[1].split("```")[0]
    config = tmp_path / "pyproject.toml"
    config.write_text(toml)
    loaded = read_config(config)
    defaults = default_maps(loaded, {"serve": serve.params})["serve"]
    assert defaults["mask"] == ["iso-datetime", "iso-date", "uuid"]
    assert defaults["max_age"] == "30d"
    [(cassette, rules)] = cassette_rules_from(loaded)
    assert cassette == "tests/test_reports" and rules.masks[0].placeholder == "report-N"
    assert serve.make_context("serve", [], default_map=defaults).params["max_age"] == 30 * 86400.0
