"""Recordings grouped by system_fingerprint: refresh classifies drift, replay picks by policy."""

from __future__ import annotations

from pathlib import Path

import httpx2
import orjson
import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.core.modes import Mode
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory

CHAT = {"model": "gpt-4o-mini", "seed": 11,
        "messages": [{"role": "user", "content": "Describe the sea."}]}


def _post(url: str, **headers: str) -> httpx2.Response:
    return httpx2.post(url + "/v1/chat/completions", json=CHAT,
                       headers={"Authorization": f"Bearer {SECRET_KEY}", **headers})


def _answer(response: httpx2.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"])


@pytest.fixture
def drifted(make_proxy: ProxyFactory, simulator: SimulatorThread) -> dict[str, str]:
    """Record under fp_a, then refresh three times: same, new fingerprint, same-fp variance."""
    simulator.state.fingerprint = "fp_a"
    answers = {}
    with make_proxy(Mode.RECORD) as proxy:
        answers["recorded"] = _answer(_post(proxy.url))
    with make_proxy(Mode.REFRESH) as proxy:
        same = _post(proxy.url)
        simulator.state.fingerprint = "fp_b"
        new_backend = _post(proxy.url)
        simulator.state.fingerprint = "fp_a"
        simulator.state.variance = 1
        varied = _post(proxy.url)
    assert same.headers["x-replay-drift"] == "same"
    assert new_backend.headers["x-replay-drift"] == "drift:fingerprint"
    assert varied.headers["x-replay-drift"] == "drift:output"
    assert _answer(same) == answers["recorded"]
    answers["fp_b"] = _answer(new_backend)
    answers["varied"] = _answer(varied)
    assert len({answers["recorded"], answers["fp_b"], answers["varied"]}) == 3
    simulator.stop()
    return answers


def test_each_selection_policy(drifted: dict[str, str], make_proxy: ProxyFactory) -> None:
    with make_proxy(Mode.REPLAY) as proxy:
        pinned = _post(proxy.url)
        chosen = _post(proxy.url, **{"X-Replay-Fingerprint": "fp_b"})
        unknown = _post(proxy.url, **{"X-Replay-Fingerprint": "fp_zzz"})
    assert (_answer(pinned), pinned.headers["x-replay-fingerprint"]) == (drifted["recorded"], "fp_a")
    assert (_answer(chosen), chosen.headers["x-replay-fingerprint"]) == (drifted["fp_b"], "fp_b")
    assert unknown.status_code == 404
    assert unknown.headers["x-replay-status"] == "miss" and unknown.headers["x-replay-key"]
    assert "fp_zzz" in unknown.json()["error"]["message"]
    assert "fp_a, fp_b" in unknown.json()["error"]["message"]
    with make_proxy(Mode.REPLAY, fingerprint="latest") as proxy:
        latest = _post(proxy.url)
    assert _answer(latest) == drifted["varied"]
    with make_proxy(Mode.REPLAY, fingerprint="fp_b") as proxy:
        assert _answer(_post(proxy.url)) == drifted["fp_b"]


def test_drift_command_reports_changes_and_exits_1(drifted: dict[str, str],
                                                   cassettes: Path) -> None:
    result = CliRunner().invoke(main, ["drift", "--cassettes", str(cassettes)])
    assert result.exit_code == 1, result.output
    assert "drift:fingerprint" in result.output and "fp_a -> fp_b" in result.output
    assert "drift:output" in result.output and "fp_a -> fp_a" in result.output
    assert "[-" in result.output and "{+" in result.output
    rows = orjson.loads(CliRunner().invoke(main, ["drift", "--cassettes", str(cassettes),
                                                  "--json"]).output)
    assert sorted(row["drift"] for row in rows) == ["drift:fingerprint", "drift:output"]


def test_ls_show_and_pin(drifted: dict[str, str], cassettes: Path,
                         make_proxy: ProxyFactory) -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["ls", "--cassettes", str(cassettes)])
    assert listed.exit_code == 0, listed.output
    assert "chat/completions" in listed.output and "fp_a,fp_b" in listed.output
    rows = orjson.loads(runner.invoke(main, ["ls", "--cassettes", str(cassettes), "--json"]).output)
    assert len(rows) == 1
    row = rows[0]
    # The refresh that got the same answer noted it on the recording instead of storing a copy.
    assert (row["model"], row["seed"], row["recordings"], row["fingerprints"]) == \
        ("gpt-4o-mini", 11, 3, ["fp_a", "fp_b"])
    assert row["last_used"] is not None and row["size"] > 0
    shown = runner.invoke(main, ["show", row["key"][:8], "--cassettes", str(cassettes)])
    assert shown.exit_code == 0 and "Describe the sea." in shown.output
    assert drifted["fp_b"] in shown.output and "drift:output" in shown.output
    assert runner.invoke(main, ["show", "ffffffff", "--cassettes", str(cassettes)]).exit_code == 1

    refused = runner.invoke(main, ["pin", row["key"][:8], "--fingerprint", "fp_nope",
                                   "--cassettes", str(cassettes)])
    assert refused.exit_code == 1 and "recorded: fp_a, fp_b" in refused.output
    pinned = runner.invoke(main, ["pin", row["key"][:8], "--fingerprint", "fp_b",
                                  "--cassettes", str(cassettes), "--json"])
    assert pinned.exit_code == 0, pinned.output
    assert orjson.loads(pinned.output) == {"cassette": "default", "key": row["key"],
                                           "pinned": "fp_b", "previous": "fp_a"}
    with make_proxy(Mode.REPLAY) as proxy:
        response = _post(proxy.url)
    assert (_answer(response), response.headers["x-replay-fingerprint"]) == \
        (drifted["fp_b"], "fp_b")


def test_verify_audits_the_provider(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                    cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        list(client.chat.completions.create(**CHAT, stream=True))
        client.embeddings.create(model="text-embedding-3-small", input="x")
    runner = CliRunner()
    args = ["verify", "--cassettes", str(cassettes), "--openai-upstream", simulator.url,
            "--openai-api-key", SECRET_KEY]
    calls = simulator.state.calls
    same = runner.invoke(main, args)
    assert same.exit_code == 0, same.output
    assert same.output.count("same ") == 3 and "summary: 3 same" in same.output
    assert simulator.state.calls == calls + 3
    simulator.state.fingerprint = "fp_new"
    changed = runner.invoke(main, [*args, "--json"])
    assert changed.exit_code == 1
    results = sorted(row["result"] for row in orjson.loads(changed.output))
    assert results == ["drift:fingerprint", "drift:fingerprint", "same"]  # embeddings carry none
    assert CliRunner().invoke(main, ["drift", "--cassettes", str(cassettes)]).exit_code == 0
    updated = runner.invoke(main, [*args, "--update"])
    assert updated.exit_code == 1 and "drift stored" in updated.output
    assert CliRunner().invoke(main, ["drift", "--cassettes", str(cassettes)]).exit_code == 1


def test_probe_sees_the_seed_effect(simulator: SimulatorThread) -> None:
    base = ["probe", "--base-url", simulator.url + "/v1", "--api-key", "sk-x", "--model",
            "gpt-4o-mini", "--prompt", "Write a haiku.", "-n", "5", "--json"]
    unseeded = orjson.loads(CliRunner().invoke(main, base).output)
    seeded = orjson.loads(CliRunner().invoke(main, [*base, "--seed", "42"]).output)
    assert unseeded["distinct_outputs"] == 5 and unseeded["similarity"] < 1
    assert seeded["distinct_outputs"] == 1 and seeded["similarity"] == 1.0
    assert seeded["fingerprints"] == ["fp_sim_a1b2c3"]
    assert simulator.state.calls == 10


def test_stats_and_prune(make_proxy: ProxyFactory, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        client.chat.completions.create(**{**CHAT, "seed": 12})
        client.chat.completions.create(**CHAT)
    with make_proxy(Mode.REPLAY) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key="x") as client:
        client.chat.completions.create(**CHAT)
    runner = CliRunner()
    report = orjson.loads(runner.invoke(main, ["stats", "--cassettes", str(cassettes),
                                               "--json"]).output)
    assert len(report["runs"]) == 2
    assert report["totals"]["hits"] == 2 and report["totals"]["recorded"] == 2
    assert report["totals"]["upstream_calls"] == 2 and report["totals"]["tokens_replayed"] > 0
    assert "total" in runner.invoke(main, ["stats", "--cassettes", str(cassettes)]).output
    only = orjson.loads(runner.invoke(main, ["stats", "--cassettes", str(cassettes), "--cassette",
                                             "default", "--json"]).output)
    assert only["totals"]["hits"] == 2
    none = orjson.loads(runner.invoke(main, ["stats", "--cassettes", str(cassettes), "--cassette",
                                             "other", "--json"]).output)
    assert none["runs"] == [] and none["totals"] == {}
    dry = runner.invoke(main, ["prune", "--cassettes", str(cassettes), "--dry-run"])
    assert dry.exit_code == 0 and "would delete 1 key(s)" in dry.output
    first_run = report["runs"][0]["run"]
    kept = runner.invoke(main, ["prune", "--cassettes", str(cassettes), "--since-run", first_run])
    assert "deleted 0 key(s)" in kept.output
    pruned = runner.invoke(main, ["prune", "--cassettes", str(cassettes)])
    assert "deleted 1 key(s)" in pruned.output
    rows = orjson.loads(runner.invoke(main, ["ls", "--cassettes", str(cassettes), "--json"]).output)
    assert [row["seed"] for row in rows] == [11]


def test_export_and_import_are_lossless(make_proxy: ProxyFactory, cassettes: Path,
                                        tmp_path: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/c/suite/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
        list(client.chat.completions.create(**CHAT, stream=True))
    runner = CliRunner()
    cache = f"diskcache:{tmp_path / 'cache'}"
    out = runner.invoke(main, ["export", "--from", str(cassettes), "--to", cache])
    assert out.exit_code == 0 and "copied 2 key(s)" in out.output
    back = tmp_path / "back"
    assert runner.invoke(main, ["import", "--from", cache, "--to", str(back)]).exit_code == 0
    originals = sorted(p.relative_to(cassettes) for p in cassettes.glob("suite/*.json"))
    assert originals == sorted(p.relative_to(back) for p in back.glob("suite/*.json"))
    for name in originals:
        assert (back / name).read_bytes() == (cassettes / name).read_bytes()


def test_inject_seed_adds_a_seed_and_changes_the_key(make_proxy: ProxyFactory,
                                                     simulator: SimulatorThread) -> None:
    unseeded = {k: v for k, v in CHAT.items() if k != "seed"}
    with make_proxy(Mode.RECORD, inject_seed=99) as proxy:
        first = httpx2.post(proxy.url + "/v1/chat/completions", json=unseeded,
                            headers={"Authorization": "Bearer sk-x"})
        explicit = httpx2.post(proxy.url + "/v1/chat/completions", json={**unseeded, "seed": 99},
                               headers={"Authorization": "Bearer sk-x"})
    assert simulator.state.calls == 1
    assert explicit.headers["x-replay-status"] == "hit"
    assert first.headers["x-replay-key"] == explicit.headers["x-replay-key"]


def test_usage_log_ignores_itself_in_git(make_proxy: ProxyFactory, cassettes: Path) -> None:
    import subprocess

    with make_proxy(Mode.RECORD) as proxy, OpenAI(base_url=proxy.url + "/v1",
                                                  api_key=SECRET_KEY) as client:
        client.chat.completions.create(**CHAT)
    subprocess.run(["git", "init", "-q", str(cassettes)], check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=cassettes, capture_output=True, text=True, check=True).stdout
    assert "default/chat.completions-" in status
    assert ".replay-proxy" not in status


def test_refresh_counts_a_same_answer_once_and_notes_when(drifted: dict[str, str],
                                                          cassettes: Path) -> None:
    [path] = [p for p in cassettes.rglob("*.json") if ".replay-proxy" not in p.parts]
    document = orjson.loads(path.read_bytes())
    first, *others = document["recordings"]
    assert first["verified_at"] >= first["recorded_at"]
    assert [r.get("drift") for r in others] == ["drift:fingerprint", "drift:output"]
    assert all("verified_at" not in r for r in others)


def test_new_text_under_a_newer_unpinned_fingerprint_is_output_drift(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    """Pinned fp_a; a refresh stores fp_b; fp_b then answers differently: output drift, the
    event the seed documentation warns about, not another fingerprint change."""
    simulator.state.fingerprint = "fp_a"
    with make_proxy(Mode.RECORD) as proxy:
        _post(proxy.url)
    with make_proxy(Mode.REFRESH) as proxy:
        simulator.state.fingerprint = "fp_b"
        assert _post(proxy.url).headers["x-replay-drift"] == "drift:fingerprint"
        assert _post(proxy.url).headers["x-replay-drift"] == "same"
        simulator.state.variance = 1
        assert _post(proxy.url).headers["x-replay-drift"] == "drift:output"
