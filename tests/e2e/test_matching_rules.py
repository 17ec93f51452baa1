"""When prompts change every run: masks, ignored paths, redaction and expiry, recorded with the
real openai SDK against the simulator and replayed with the simulator stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from click.testing import CliRunner
from openai import OpenAI
from replay_proxy.core.canonical import KeyPolicy
from replay_proxy.core.modes import Mode
from replay_proxy.core.rules import Rules
from replay_proxy.tools.cli import main
from replay_proxy.tools.testing import ProxyThread, SimulatorThread

from tests.conftest import SECRET_KEY, ProxyFactory, recorded_files, stored_bytes


def policy(**rules: list[str]) -> KeyPolicy:
    return KeyPolicy.build(rules=Rules.parse(**rules))


def ask(proxy: ProxyThread, system: str, *, name: str | None = None) -> str:
    user: dict[str, Any] = {"role": "user", "content": "What should I do today?"}
    if name is not None:
        user["name"] = name
    with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", seed=7, messages=[{"role": "system", "content": system}, user])
    return str(reply.choices[0].message.content)


def test_a_dated_prompt_recorded_today_replays_on_a_later_day(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> None:
    masked = policy(masks=["iso-date"])
    with make_proxy(Mode.RECORD, key_policy=masked) as proxy:
        recorded = ask(proxy, "Today is 2026-11-21. Be brief.")
    simulator.stop()
    with make_proxy(Mode.REPLAY, key_policy=masked) as proxy:
        assert ask(proxy, "Today is 2026-12-03. Be brief.") == recorded  # a later day
        assert proxy.state.totals["hits"] == 1
    [document] = [orjson.loads(path.read_bytes()) for path in recorded_files(cassettes)]
    # The stored request shows what the key ignored; the rules travel with the recording.
    assert document["request"]["body"]["messages"][0]["content"] == "Today is <iso-date>. Be brief."
    assert document["rules"] == {"mask": ["iso-date"]}


def test_a_changed_message_name_is_ignored_by_path(make_proxy: ProxyFactory,
                                                  simulator: SimulatorThread) -> None:
    ignoring = policy(ignore_paths=["messages[*].name"])
    with make_proxy(Mode.RECORD, key_policy=ignoring) as proxy:
        recorded = ask(proxy, "Be brief.", name="run_1234")
    simulator.stop()
    with make_proxy(Mode.REPLAY, key_policy=ignoring) as proxy:
        assert ask(proxy, "Be brief.", name="run_5678") == recorded


@pytest.mark.parametrize("store", ["directory", "diskcache", "redis"])
def test_a_redacted_email_never_reaches_a_store_yet_replays(
        store: str, make_proxy: ProxyFactory, simulator: SimulatorThread, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    spec = {"directory": None, "diskcache": f"diskcache:{tmp_path / 'cache'}",
            "redis": request.getfixturevalue("redis_url") if store == "redis" else None}[store]
    redacting = policy(redactions=["email"])

    def ask_for(proxy: ProxyThread, email: str) -> str:
        with OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
            # The simulator says the instructions back in its answer, plain and streamed.
            answer = client.responses.create(model="gpt-4o-mini", input="Draft a reply.",
                                             instructions=f"Sign as {email}.")
            streamed = "".join(event.delta for event in client.responses.create(
                model="gpt-4o-mini", input="Draft a reply.", instructions=f"Sign as {email}.",
                stream=True) if event.type == "response.output_text.delta")
        return f"{answer.instructions} | {streamed}"

    with make_proxy(Mode.RECORD, key_policy=redacting, store=spec) as proxy:
        live = ask_for(proxy, "ann.lee@example.com")
    assert "ann.lee@example.com" in live  # the live client sees the real answer
    simulator.stop()
    with make_proxy(Mode.REPLAY, key_policy=redacting, store=spec) as proxy:
        # Another address is the same request once redacted: the recording answers it.
        replayed = ask_for(proxy, "bob@corp.example.org")
        assert proxy.state.totals["hits"] == 2 and proxy.state.totals["misses"] == 0
    assert "[REDACTED]" in replayed and "example" not in replayed
    if store == "redis":
        import redis

        client = redis.Redis.from_url(spec or "")
        everything = b"".join(client.dump(key) or b"" for key in client.keys("*"))
        client.close()
    else:
        everything = stored_bytes(tmp_path)
    assert b"ann.lee@example.com" not in everything and b"bob@corp" not in everything


def test_an_expired_recording_is_recorded_again_but_still_replays(
        make_proxy: ProxyFactory, simulator: SimulatorThread, cassettes: Path) -> None:
    with make_proxy(Mode.RECORD) as proxy:
        recorded = ask(proxy, "Be brief.")
    [path] = recorded_files(cassettes)
    document = orjson.loads(path.read_bytes())
    document["recordings"][0]["recorded_at"] = "2025-01-01T00:00:00.000Z"  # long ago
    path.write_bytes(orjson.dumps(document))
    calls = simulator.state.calls
    listed = CliRunner().invoke(main, ["ls", "--cassettes", str(cassettes), "--stale",
                                       "--max-age", "30d", "--json"])
    assert [row["confirmed"] for row in orjson.loads(listed.output)] == \
        ["2025-01-01T00:00:00.000Z"]
    assert CliRunner().invoke(main, ["ls", "--cassettes", str(cassettes), "--stale"]) \
        .exit_code == 2  # no age to compare with

    with make_proxy(Mode.REPLAY, max_age=30 * 86400.0) as proxy:
        assert ask(proxy, "Be brief.") == recorded  # stale, and replayed all the same
        assert proxy.state.totals["stale"] == 1
    assert simulator.state.calls == calls
    with make_proxy(Mode.RECORD, max_age=30 * 86400.0) as proxy, \
            OpenAI(base_url=proxy.url + "/v1", api_key=SECRET_KEY, max_retries=0) as client:
        def raw() -> Any:
            return client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", seed=7, messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What should I do today?"}])

        again = raw()  # asked again, and classified as refresh does
        assert again.parse().choices[0].message.content == recorded
        assert again.headers["x-replay-status"] == "recorded"
        assert again.headers["x-replay-drift"] == "same"
    with make_proxy(Mode.RECORD, max_age=30 * 86400.0) as proxy:
        assert ask(proxy, "Be brief.") == recorded  # fresh now: a hit
    assert simulator.state.calls == calls + 1
    stored = orjson.loads(path.read_bytes())
    assert len(stored["recordings"]) == 1 and stored["recordings"][0]["verified_at"] > "2026"
    fresh = CliRunner().invoke(main, ["ls", "--cassettes", str(cassettes), "--stale",
                                      "--max-age", "30d", "--json"])
    assert orjson.loads(fresh.output) == []


def test_replaying_under_other_rules_explains_the_miss(
        make_proxy: ProxyFactory, simulator: SimulatorThread) -> None:
    with make_proxy(Mode.RECORD, key_policy=policy(masks=["iso-date"])) as proxy:
        ask(proxy, "Today is 2026-11-21. Be brief.")
    simulator.stop()
    with make_proxy(Mode.REPLAY, key_policy=policy(masks=["uuid"])) as proxy, \
            pytest.raises(openai.NotFoundError) as missed:
        ask(proxy, "Today is 2026-11-22. Be brief.")
    message = missed.value.response.json()["error"]["message"]
    assert "keyed under other matching rules" in message
    assert "--mask 'iso-date' was in force when recorded and is not now" in message
    assert "--mask 'uuid' is new" in message


def test_a_miss_shows_the_value_before_the_masks(make_proxy: ProxyFactory,
                                                 simulator: SimulatorThread) -> None:
    masked = policy(masks=["iso-date"])
    with make_proxy(Mode.RECORD, key_policy=masked) as proxy:
        ask(proxy, "Today is 2026-11-21. Be brief.")
    simulator.stop()
    with make_proxy(Mode.REPLAY, key_policy=masked) as proxy, \
            pytest.raises(openai.NotFoundError) as missed:
        ask(proxy, "Today is 2026-11-22. Be verbose.")
    message = missed.value.response.json()["error"]["message"]
    assert '"Today is <iso-date>. Be brief." -> "Today is <iso-date>. Be verbose."' in message
    assert "today's value before masks and redactions: \"Today is 2026-11-22. Be verbose.\"" \
        in message
    assert "other matching rules" not in message


def test_rules_from_the_configuration_file_shared_and_per_cassette(
        simulator: SimulatorThread, tmp_path: Path) -> None:
    from replay_proxy.tools.testing import run_proxy_process

    config = tmp_path / "replay-proxy.toml"
    config.write_text('mask = ["iso-date"]\n\n'
                      '[cassette-rules."suite"]\nignore-path = ["messages[*].name"]\n')
    environ = {"REPLAY_PROXY_CONFIG": str(config)}
    common = ("--cassettes", str(tmp_path / "cassettes"))

    def ask_in(url: str, cassette: str, day: str, name: str) -> str:
        with OpenAI(base_url=f"{url}/c/{cassette}/v1", api_key="sk-x", max_retries=0) as client:
            return str(client.chat.completions.create(model="gpt-4o-mini", seed=1, messages=[
                {"role": "system", "content": f"Today is {day}."},
                {"role": "user", "content": "Plan my day.", "name": name}]).choices[0]
                .message.content)

    with run_proxy_process("--mode", "record", "--openai-upstream", simulator.url, *common,
                           env=environ) as (url, _):
        suite = ask_in(url, "suite", "2026-11-21", "ann")
        other = ask_in(url, "other", "2026-11-21", "ann")
    simulator.stop()
    with run_proxy_process("--mode", "replay", *common, env=environ) as (url, _):
        assert ask_in(url, "suite", "2026-11-30", "bob") == suite  # date masked, name ignored
        assert ask_in(url, "other", "2026-11-30", "ann") == other  # the shared mask only
        with pytest.raises(openai.NotFoundError):
            ask_in(url, "other", "2026-11-30", "bob")  # the name counts in this cassette


@pytest.mark.parametrize(("table", "fragment"), [
    ('[cassette-rules."suite"]\nmask = ["(unclosed"]\n', "not a valid regular expression"),
    ('[cassette-rules."suite"]\ncolour = ["x"]\n', "unknown key 'colour'"),
    ('[cassette-rules."../up"]\nmask = ["uuid"]\n', "Invalid cassette name"),
    ('[cassette-rules."suite"]\nignore-path = ["seed"]\n', "decides the answer"),
])
def test_bad_cassette_rules_name_the_file_and_key(table: str, fragment: str,
                                                  tmp_path: Path) -> None:
    from click.testing import CliRunner
    from replay_proxy.tools.cli import main

    config = tmp_path / "replay-proxy.toml"
    config.write_text(table)
    result = CliRunner().invoke(main, ["--config", str(config), "serve", "--port", "1"])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "replay-proxy.toml" in result.output


def test_verify_skips_what_the_rules_changed(make_proxy: ProxyFactory, simulator: SimulatorThread,
                                            cassettes: Path) -> None:
    """A masked request was stored with placeholders: re-sending it would ask something else."""
    with make_proxy(Mode.RECORD, key_policy=policy(masks=["iso-date"])) as proxy:
        ask(proxy, "Today is 2026-11-21. Be brief.")
    calls = simulator.state.calls
    result = CliRunner().invoke(main, ["verify", "--cassettes", str(cassettes), "--json",
                                       "--openai-upstream", simulator.url])
    [verdict] = orjson.loads(result.stdout)
    assert verdict["result"] == "skipped" and "keyed under --mask" in verdict["detail"]
    assert simulator.state.calls == calls and result.exit_code == 2  # nothing was verified
