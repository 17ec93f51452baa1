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


def _tour_requests() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A one-minute tour, offline")[1].split("\n## ")[0]
    commands = re.findall(r"^curl .*?(?<!\\)$", tour.replace("\\\n", " "), flags=re.M | re.S)
    requests = []
    for command in commands:
        words = shlex.split(command)
        requests.append((words[words.index("-d") + 1], next(w for w in words if w.startswith("http"))))
    return requests


def test_tour_shows_a_hit_a_stream_and_a_miss_explanation() -> None:
    requests = _tour_requests()
    assert len(requests) == 3
    readme = (ROOT / "README.md").read_text()
    with run_proxy(Settings(cassettes=ROOT / "cassettes", mode=Mode.REPLAY,
                            openai_upstream="http://127.0.0.1:9")) as proxy:
        responses = [httpx2.post(url.replace("http://127.0.0.1:8787", proxy.url), content=body,
                                 headers={"Content-Type": "application/json"})
                     for body, url in requests]
    hit, stream, miss = responses
    assert hit.headers["x-replay-status"] == "hit" and hit.json()["object"] == "chat.completion"
    assert stream.headers["x-replay-status"] == "hit"
    assert stream.text.endswith("data: [DONE]\n\n")
    assert miss.status_code == 404
    message = miss.json()["error"]["message"]
    shown = readme.split("The miss says:")[1].split("```")[1].strip()
    for line in shown.splitlines():
        assert line.strip(" .").removesuffix("...") in message.replace("\n", " ")
