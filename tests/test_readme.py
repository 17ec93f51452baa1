"""The README tour works as written against the committed example cassette."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx2
from replay_proxy.core.modes import Mode
from replay_proxy.core.settings import Settings
from replay_proxy.tools.testing import run_proxy

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
