"""The pytest plugin, driven through pytester on real test files against the simulator."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from replay_proxy.tools.testing import SimulatorThread

TEST_FILE = '''
import pytest
from openai import AzureOpenAI, OpenAI


@pytest.mark.replay
def test_fact():
    client = OpenAI()
    reply = client.chat.completions.create(
        model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": "PROMPT"}])
    assert reply.choices[0].message.content


@pytest.mark.replay(cassette="shared-azure")
def test_azure():
    client = AzureOpenAI(api_version="2024-10-21")
    assert client.embeddings.create(model="embed", input="hello").data


def test_fixture_streams(replay_proxy):
    client = OpenAI(base_url=replay_proxy.base_url, api_key="sk-fixture")
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", seed=2, stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert replay_proxy.hits + replay_proxy.recordings == 1
    assert replay_proxy.cassette == "test_app/test_fixture_streams"
'''


@pytest.fixture
def app_tests(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_app=TEST_FILE.replace("PROMPT", "Name a moon of Mars."))
    for name in ("CI", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "OPENAI_BASE_URL",
                 "AZURE_OPENAI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def record_run(pytester: pytest.Pytester, simulator: SimulatorThread,
               monkeypatch: pytest.MonkeyPatch, *extra: str) -> pytest.RunResult:
    """A record run against the simulator, with a key and outside CI, as a developer runs it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_subprocess(
        *extra, "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "-p", "no:cacheprovider")


def _record(app_tests: pytest.Pytester, simulator: SimulatorThread,
            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-recording-key")
    result = app_tests.runpytest_subprocess(
        "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "--replay-azure-upstream", simulator.url, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*replay-proxy*", "*3 test(s) through the proxy: 0 hit(s), "
                                 "0 miss(es), 3 recording(s) made, 3 upstream call(s)*"])
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")
    simulator.stop()


def test_record_then_replay_offline(app_tests: pytest.Pytester, simulator: SimulatorThread,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _record(app_tests, simulator, monkeypatch)
    cassettes = app_tests.path / "cassettes"
    assert len(list((cassettes / "test_app" / "test_fact").glob("chat.completions-*.json"))) == 1
    assert len(list((cassettes / "shared-azure").glob("embeddings-*.json"))) == 1
    replayed = app_tests.runpytest_subprocess("--replay-mode", "replay", "-p", "no:cacheprovider")
    replayed.assert_outcomes(passed=3)
    replayed.stdout.fnmatch_lines(["*3 hit(s), 0 miss(es), 0 recording(s) made, "
                                   "0 upstream call(s)*"])


def test_ci_replays_by_default_and_a_changed_prompt_explains_itself(
        app_tests: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _record(app_tests, simulator, monkeypatch)
    monkeypatch.setenv("CI", "true")
    app_tests.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=3)

    app_tests.makepyfile(test_app=TEST_FILE.replace("PROMPT", "Name a moon of Jupiter."))
    failed = app_tests.runpytest_subprocess("-p", "no:cacheprovider")
    failed.assert_outcomes(passed=2, failed=1)
    output = failed.stdout.str()
    assert "replay-proxy: 1 request(s) had no recording in cassette 'test_app/test_fact'" in output
    assert 'messages[0].content: "Name a moon of Mars." -> "Name a moon of Jupiter."' in output
    assert "Traceback" not in failed.stdout.str()
    failed.stdout.fnmatch_lines(["*recording(s) no test used this session*"])


def test_xdist_replay(app_tests: pytest.Pytester, simulator: SimulatorThread,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    _record(app_tests, simulator, monkeypatch)
    result = app_tests.runpytest_subprocess("--replay-mode", "replay", "-n", "2",
                                            "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*3 test(s) through the proxy: 3 hit(s), 0 miss(es)*"])


def test_mark_mode_overrides_the_session_mode(app_tests: pytest.Pytester,
                                              simulator: SimulatorThread) -> None:
    app_tests.makepyfile(test_marked='''
import pytest
from openai import OpenAI

@pytest.mark.replay(mode="replay")
def test_never_records():
    with pytest.raises(Exception):
        OpenAI(max_retries=0).models.list()
''')
    result = app_tests.runpytest_subprocess(
        "test_marked.py", "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "-p", "no:cacheprovider")
    # The app swallowed the error, but the miss still fails the test.
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no recording in cassette 'test_marked/test_never_records'*"])
    assert simulator.state.calls == 0


def test_xdist_workers_recording_a_shared_cassette_make_one_call(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_shared='''
import pytest
from openai import OpenAI

@pytest.mark.parametrize("n", range(6))
@pytest.mark.replay(cassette="shared")
def test_same_question(n):
    reply = OpenAI().chat.completions.create(
        model="gpt-4o-mini", seed=5, messages=[{"role": "user", "content": "Same?"}])
    assert reply.choices[0].message.content
''')
    simulator.state.latency = 0.3
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_subprocess(
        "--replay-mode", "record", "--replay-openai-upstream", simulator.url, "-n", "2",
        "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert simulator.state.calls == 1
    files = list((pytester.path / "cassettes" / "shared").glob("chat.completions-*.json"))
    assert len(files) == 1


STATEFUL_TESTS = '''
import pytest
from openai import OpenAI

FINISHED = ("completed", "failed", "cancelled", "expired")


def poll_a_job(client):
    response = client.responses.create(model="gpt-4o-mini", input="Tides?", background=True)
    statuses = [response.status]
    while response.status not in FINISHED:
        response = client.responses.retrieve(response.id)
        statuses.append(response.status)
    return response.id, statuses


@pytest.mark.replay(cassette="jobs")
def test_first():
    assert poll_a_job(OpenAI())[1][-1] == "completed"


@pytest.mark.replay(cassette="jobs")
def test_second():
    # Its own session: the same flow replays from the first recording, not the fifth.
    assert poll_a_job(OpenAI())[1][-1] == "completed"
'''


def test_every_test_is_a_session_of_its_own(pytester: pytest.Pytester,
                                            simulator: SimulatorThread,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_jobs=STATEFUL_TESTS)
    simulator.state.poll_steps = 2
    recorded = record_run(pytester, simulator, monkeypatch)
    recorded.assert_outcomes(passed=2)
    # A create and three polls, asked once: the second test replayed the first one's sequence.
    assert simulator.state.calls == 4
    recorded.stdout.fnmatch_lines(["*2 test(s) through the proxy: 4 hit(s), 0 miss(es), "
                                   "4 recording(s) made, 4 upstream call(s)*"])
    simulator.stop()
    monkeypatch.delenv("OPENAI_API_KEY")
    for selection in ([], ["-k", "second"], ["-p", "xdist", "-n", "2"]):
        replayed = pytester.runpytest_subprocess("--replay-mode", "replay",
                                                 "-p", "no:cacheprovider", *selection)
        replayed.assert_outcomes(passed=1 if selection[:1] == ["-k"] else 2)
        replayed.stdout.fnmatch_lines(["*0 miss(es), 0 recording(s) made, 0 upstream call(s)*"])


TEMPERATURE_TESTS = '''
import pytest
from openai import OpenAI


def ask(temperature):
    return OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", seed=3, temperature=temperature,
        messages=[{"role": "user", "content": "Pick a colour."}])


@pytest.mark.replay(cassette="CASSETTE")
def test_first():
    ask(0.1)


@pytest.mark.replay(cassette="CASSETTE")
def test_second():
    ask(0.9)
'''


def test_one_configuration_file_and_replay_config_per_directory(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """[tool.replay-proxy] configures the plugin as it does the command; a conftest.py's
    replay_config changes the options for its directory only."""
    pytester.makepyprojecttoml(
        f'[tool.pytest.ini_options]\nasyncio_default_fixture_loop_scope = "function"\n\n'
        f'[tool.replay-proxy]\nmode = "record"\nopenai-upstream = "{simulator.url}"\n'
        f'cassettes = "recordings"\n'
        # For serve and run only: valid in the file, and not in the way of pytest.
        f'port = 8790\nworkers = 2\nallow-misses = true\n')
    ignoring = pytester.mkpydir("ignoring")
    (ignoring / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef replay_config():\n"
        "    return {'ignore_field': ['temperature']}\n")
    (ignoring / "test_ignoring.py").write_text(
        TEMPERATURE_TESTS.replace("CASSETTE", "ignoring"))
    keyed = pytester.mkpydir("keyed")
    (keyed / "test_keyed.py").write_text(
        TEMPERATURE_TESTS.replace("CASSETTE", "keyed"))
    for name in ("CI", "OPENAI_BASE_URL", "REPLAY_PROXY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    # With temperature ignored, the second question is the first one's hit.
    result.stdout.fnmatch_lines(["*4 test(s) through the proxy: 1 hit(s), 0 miss(es), "
                                 "3 recording(s) made*"])
    assert len(list((pytester.path / "recordings" / "ignoring").glob("*.json"))) == 1
    assert len(list((pytester.path / "recordings" / "keyed").glob("*.json"))) == 2
    assert simulator.state.calls == 3

    # A flag beats the file; the miss tells a pytest user the option to pass.
    simulator.stop()
    (keyed / "test_keyed.py").write_text(
        TEMPERATURE_TESTS.replace("CASSETTE", "keyed").replace("0.9", "0.5"))
    replayed = pytester.runpytest_subprocess("--replay-mode", "replay", "-p", "no:cacheprovider")
    replayed.assert_outcomes(passed=3, failed=1)
    output = replayed.stdout.str()
    assert re.search(r"temperature: 0\.[19] -> 0\.5", output)
    assert "run pytest with --replay-mode record" in output
    assert "pass --replay-ignore-field NAME" in output


def test_serve_options_as_pytest_options_and_ini_keys(pytester: pytest.Pytester,
                                                      simulator: SimulatorThread,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini(f"[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                     f"replay_openai_upstream = {simulator.url}\nreplay_mode = record\n")
    pytester.makepyfile(test_seeded='''
import pytest
from openai import OpenAI

@pytest.mark.replay
def test_without_a_seed():
    OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Unseeded"}])
''')
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.delenv("CI", raising=False)
    # --replay-inject-seed exists because serve has --inject-seed: nothing names it in the plugin.
    result = pytester.runpytest_subprocess("--replay-inject-seed", "77", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    [stored] = (pytester.path / "cassettes" / "test_seeded" / "test_without_a_seed").glob("*")
    assert '"seed": 77' in stored.read_text()

    help_text = pytester.runpytest_subprocess("--help").stdout.str()
    for option in ("--replay-max-body", "--replay-sequence", "--replay-timing",
                   "--replay-log-level", "replay_ignore_field (linelist)"):
        assert option in help_text
    assert "--replay-openai-api-key" not in help_text  # credentials: the environment only

    pytester.makepyfile(conftest='''
import pytest

@pytest.fixture
def replay_config():
    return {"ignore_feild": ["user"]}
''')
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    bad.assert_outcomes(errors=1)
    bad.stdout.fnmatch_lines(["*replay-proxy: replay_config: unknown key 'ignore_feild'*"])
    assert "azure-api-key" not in bad.stdout.str()  # a credential is not offered as a key
    bad_flag = pytester.runpytest_subprocess("--replay-mode", "bogus")
    assert bad_flag.ret == pytest.ExitCode.USAGE_ERROR
    bad_flag.stderr.fnmatch_lines(["*replay-proxy*'bogus' is not one of*"])


def test_cassettes_follow_the_node_id(pytester: pytest.Pytester, simulator: SimulatorThread,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tests named alike in different folders and classes never share a cassette."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    for folder, klass, prompt in (("a", "TestA", "first"), ("b", "TestB", "second")):
        package = pytester.path / "tests" / folder
        package.mkdir(parents=True)
        for made in (package, package.parent):
            (made / "__init__.py").touch()
        (package / "test_x.py").write_text(f'''
import pytest
from openai import OpenAI


class {klass}:
    @pytest.mark.replay
    @pytest.mark.parametrize("n", [1])
    def test_call(self, n, replay_proxy):
        OpenAI().chat.completions.create(
            model="gpt-4o-mini", seed=n, messages=[{{"role": "user", "content": "{prompt}"}}])
        assert replay_proxy.cassette == "tests/{folder}/test_x/{klass}/test_call-1"
''')
    result = record_run(pytester, simulator, monkeypatch)
    result.assert_outcomes(passed=2)
    assert simulator.state.calls == 2  # not one answer shared by both
    for folder, klass in (("a", "TestA"), ("b", "TestB")):
        recorded = pytester.path / "cassettes" / "tests" / folder / "test_x" / klass / "test_call-1"
        assert len(list(recorded.glob("chat.completions-*.json"))) == 1


PID_TESTS = '''
import json
import os
import urllib.request

import pytest


@pytest.mark.replay
@pytest.mark.parametrize("n", range(4))
def test_note_the_proxy(n, replay_proxy):
    with urllib.request.urlopen(replay_proxy.proxy_url + "/_replay/health") as answer:
        pid = json.load(answer)["pid"]
    with open(os.environ["PIDS"], "a") as pids:
        pids.write(f"{pid}\\n")
    if os.environ.get("HANG"):
        import time
        time.sleep(60)
'''
OWN_CONFIG = ("import pytest\n\n@pytest.fixture\ndef replay_config():\n"
              "    return {'record_errors': True}\n")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pids: set[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pids(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()} if path.exists() else set()


def test_the_proxy_lives_exactly_as_long_as_the_session(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """One proxy process for the session, shared by the xdist workers; a directory with a
    replay_config of its own gets one per worker; all stop when the session ends, and when
    pytest is killed."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_shared=PID_TESTS)
    own = pytester.mkpydir("own")
    (own / "conftest.py").write_text(OWN_CONFIG)
    (own / "test_own.py").write_text(PID_TESTS)
    monkeypatch.delenv("CI", raising=False)
    for run, selection in enumerate(([], ["-n", "2"])):
        pids = pytester.path / f"pids-{run}"
        monkeypatch.setenv("PIDS", str(pids))
        result = pytester.runpytest_subprocess("--replay-mode", "replay",
                                               "-p", "no:cacheprovider", *selection)
        result.assert_outcomes(passed=8)
        seen = _pids(pids)
        # The shared one, and one more for the other configuration (in each worker that ran
        # its tests); none is left once pytest is done.
        assert 2 <= len(seen) <= (2 if not selection else 3), seen
        assert _gone(seen, timeout=2.0), f"proxies left running: {seen}"

    for run, selection in enumerate(([], ["-n", "2"])):
        pids = pytester.path / f"hung-{run}"
        environ = {**os.environ, "PIDS": str(pids), "HANG": "1"}
        # A process group of its own, so that the xdist workers a killed controller leaves
        # behind can be cleaned up afterwards.
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "test_shared.py", "--replay-mode", "replay",
             "-p", "no:cacheprovider", *selection], cwd=pytester.path, env=environ,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not _pids(pids):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
            seen = _pids(pids)
            assert all(_alive(pid) for pid in seen)
            os.kill(process.pid, signal.SIGKILL)  # no hook of pytest's runs after this
            process.wait()
            assert _gone(seen), f"proxies outlived a killed pytest: {seen}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_suite_that_does_not_use_the_plugin_pays_for_the_option_table_only(
        pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest('''
import sys

def pytest_sessionfinish(session):
    heavy = [name for name in ("click", "aiohttp", "replay_proxy.server.handler",
                               "replay_proxy.tools.configuration",
                               "replay_proxy.tools.proxy_process") if name in sys.modules]
    assert not heavy, heavy
    # Nor a hook asked about every collected path, nor hooks around every test.
    assert not session.config.pluginmanager.has_plugin("replay-proxy-collection-skip")
    assert not session.config.pluginmanager.has_plugin("replay-proxy-session-hooks")
    print("light:", "replay_proxy.tools.pytest_plugin" in sys.modules)
''')
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*light: True*"])  # loaded, and nothing heavy with it
    assert "through the proxy" not in result.stdout.str()  # no summary either


def test_recordings_that_could_not_be_stored_fail_the_session(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_app=TEST_FILE.replace("PROMPT", "Name a moon of Mars."))
    # The test's cassette folder is a link to nowhere: its recording cannot be written.
    broken = pytester.path / "cassettes" / "test_app"
    broken.mkdir(parents=True)
    (broken / "test_fact").symlink_to(pytester.path / "cassettes" / "nowhere" / "at-all")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-recording-key")
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_subprocess(
        "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "--replay-azure-upstream", simulator.url, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)  # the tests had their answers
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*3 test(s) through the proxy: 0 hit(s), 0 miss(es), 2 recording(s) made, "
        "3 upstream call(s), 1 store error(s)*",
        "*could not store the answer for POST chat/completions (cassette test_app/test_fact*",
        "*replay-proxy: failing the session: 1 recording(s) could not be stored*"])


PARTIAL_TESTS = '''
import pytest
from openai import OpenAI


@pytest.mark.replay
@pytest.mark.parametrize("topic", ["moons", "rings", "storms"])
def test_ask(topic):
    OpenAI().chat.completions.create(
        model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": topic}])
'''


def test_a_partial_run_only_reports_what_it_touched_under_one_run_id(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_partial=PARTIAL_TESTS)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest_subprocess(
        "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "-p", "no:cacheprovider").assert_outcomes(passed=3)
    # A recording that only the moons test's cassette holds, which no request asks for.
    moons = pytester.path / "cassettes" / "test_partial" / "test_ask-moons"
    [recorded] = moons.glob("*.json")
    stale = moons / ("embeddings-" + "0" * 64 + ".json")
    stale.write_bytes(recorded.read_bytes().replace(
        recorded.stem.rpartition("-")[2].encode(), b"0" * 64).replace(
        b'"chat.completions"', b'"embeddings"'))
    simulator.stop()
    monkeypatch.delenv("OPENAI_API_KEY")
    state = pytester.path / "cassettes" / ".replay-proxy"
    runs_before = set((state / "runs").iterdir())
    usage_before = len((state / "usage.jsonl").read_bytes().splitlines())
    for selection in (["-k", "rings"], ["-k", "moons or storms", "-n", "2"]):
        result = pytester.runpytest_subprocess("--replay-mode", "replay",
                                               "-p", "no:cacheprovider", *selection)
        assert result.ret == 0, result.stdout.str()
        output = result.stdout.str()
        if "moons" in selection[1]:
            result.stdout.fnmatch_lines(["*1 recording(s) no test used this session*"
                                         "test_partial/test_ask-moons/embeddings-000*"])
        else:  # the other tests' recordings are not this run's business
            assert "no test used" not in output
    # One run id each, the xdist workers' keys included: `prune` sees two runs.
    lines = (state / "usage.jsonl").read_bytes().splitlines()[usage_before:]
    by_run: dict[str, set[str]] = {}
    for line in map(orjson.loads, lines):
        by_run.setdefault(line["run"], set()).add(line["cassette"].rpartition("-")[2])
    assert sorted(by_run.values(), key=len) == [{"rings"}, {"moons", "storms"}]
    new_runs = set((state / "runs").iterdir()) - runs_before
    assert {run.stem.partition("~")[0] for run in new_runs} == set(by_run)


NORMALISED_TESTS = '''
import time

import pytest
from openai import OpenAI


@pytest.mark.replay
def test_ask_with_a_timestamp(replay_proxy):
    reply = OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", seed=1,
        messages=[{"role": "system", "content": f"Now is {time.time_ns()}."},
                  {"role": "user", "content": "Name a moon of Mars."}])
    assert reply.choices[0].message.content
'''
NORMALISE_CONFTEST = '''
import re

import pytest


def drop_the_time(canonical_request):
    for message in canonical_request["body"]["messages"]:
        message["content"] = re.sub(r"Now is \\d+", "Now is <time>", message["content"])
    return canonical_request


@pytest.fixture
def replay_config():
    return {"normalise": drop_the_time}
'''


def test_a_normalise_function_reaches_the_proxy_of_its_tests(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A function cannot cross into another process: tests whose replay_config holds one get a
    proxy in the test process, which keys their requests with it."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(NORMALISE_CONFTEST)
    pytester.makepyfile(test_hook=NORMALISED_TESTS + '''

def test_the_hook_is_the_proxys(replay_proxy):
    from conftest import drop_the_time
    proxy = replay_proxy.handle.thread.proxy
    assert proxy.state.settings.key_policy.normalise is drop_the_time
''')
    recorded = record_run(pytester, simulator, monkeypatch)
    recorded.assert_outcomes(passed=2)
    simulator.stop()
    monkeypatch.delenv("OPENAI_API_KEY")
    # A new timestamp in every run: replayed all the same, since the hook keyed it away.
    replayed = pytester.runpytest_subprocess("--replay-mode", "replay", "-p", "no:cacheprovider")
    replayed.assert_outcomes(passed=2)
    replayed.stdout.fnmatch_lines(["*2 test(s) through the proxy: 1 hit(s), 0 miss(es)*"])
    [stored] = (pytester.path / "cassettes" / "test_hook" / "test_ask_with_a_timestamp").glob(
        "chat.completions-*.json")
    assert "Now is <time>." in stored.read_text()  # the key's request is the normalised one


PARAMETRIZED_IDS = '''
import pytest
from openai import OpenAI


@pytest.mark.replay
@pytest.mark.parametrize("q", ["a/b", "a-b", "a b", "a?b"])
def test_q(q, replay_proxy):
    OpenAI().chat.completions.create(
        model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": q}])
    print("CASSETTE", replay_proxy.cassette)
'''


def test_parametrized_ids_that_lose_characters_keep_cassettes_of_their_own(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`a/b`, `a b` and `a?b` all read `a-b` once made safe: a digest keeps them apart, and a
    run of one of them never offers the others' recordings for pruning."""
    pytester.makepyfile(test_ids=PARAMETRIZED_IDS)
    result = record_run(pytester, simulator, monkeypatch, "-s")
    result.assert_outcomes(passed=4)
    assert simulator.state.calls == 4
    names = re.findall(r"CASSETTE (\S+)", result.stdout.str())
    assert len(set(names)) == 4, names
    assert "test_ids/test_q-a-b" in names  # a safe id keeps its plain name
    folders = [path for path in (pytester.path / "cassettes" / "test_ids").iterdir()]
    assert len(folders) == 4
    one = pytester.runpytest_subprocess("test_ids.py::test_q[a-b]", "--replay-mode", "replay",
                                        "-p", "no:cacheprovider")
    one.assert_outcomes(passed=1)
    assert "no test used" not in one.stdout.str()


SWALLOWED_ERRORS = '''
import pytest
from openai import OpenAI


@pytest.mark.replay
def test_swallows(replay_proxy):
    try:
        OpenAI(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": "hi"}])
    except Exception as error:
        print("swallowed", type(error).__name__)
'''


def test_an_error_of_the_proxys_own_fails_the_test_that_swallowed_it(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream out of reach while recording, and a corrupt cassette while replaying: the
    code under test caught the error, but nothing was recorded or replayed, so the test fails
    with the proxy's words."""
    from replay_proxy.tools.testing import free_port

    pytester.makepyfile(test_app=SWALLOWED_ERRORS)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    monkeypatch.delenv("CI", raising=False)
    down = pytester.runpytest_subprocess(
        "-s", "--replay-mode", "record", "--replay-openai-upstream",
        f"http://127.0.0.1:{free_port()}", "-p", "no:cacheprovider")
    down.assert_outcomes(failed=1)
    assert "swallowed" in down.stdout.str()
    down.stdout.fnmatch_lines(["*1 request(s) got an error of the proxy's own*",
                               "*replay-proxy answered 502*"])
    pytester.runpytest_subprocess(
        "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "-p", "no:cacheprovider").assert_outcomes(passed=1)
    [stored] = (pytester.path / "cassettes" / "test_app" / "test_swallows").glob("*.json")
    stored.write_text("<<<<<<< HEAD\n")
    corrupt = pytester.runpytest_subprocess("-s", "--replay-mode", "replay",
                                            "-p", "no:cacheprovider")
    corrupt.assert_outcomes(failed=1)
    corrupt.stdout.fnmatch_lines(["*got an error of the proxy's own*"])
    assert stored.name in corrupt.stdout.str()  # the message names the broken file


TEARDOWN_MISS = '''
import pytest
from openai import OpenAI


@pytest.fixture
def goodbye():
    yield
    try:
        OpenAI(max_retries=0).models.retrieve("gpt-4o-mini")
    except Exception:
        pass


@pytest.mark.replay
def test_nothing_yet(goodbye):
    pass
'''


def test_a_miss_while_a_fixture_is_torn_down_is_an_error_of_the_test(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_app=TEARDOWN_MISS)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = pytester.runpytest_subprocess("--replay-mode", "replay", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_nothing_yet*",
                                 "*1 request(s) had no recording*"])


BAD_CASSETTE_NAME = '''
import pytest
from openai import OpenAI


@pytest.mark.replay(cassette="../../escape")
def test_escapes():
    OpenAI().models.list()


@pytest.mark.replay
def test_fine(replay_proxy):
    assert replay_proxy.hits == 0
'''


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_a_bad_cassette_name_in_a_mark_fails_its_test_only(
        pytester: pytest.Pytester, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch,
        workers: list[str]) -> None:
    pytester.makepyfile(test_app=BAD_CASSETTE_NAME)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recording-key")
    result = pytester.runpytest_subprocess(
        *workers, "--replay-mode", "record", "--replay-openai-upstream", simulator.url,
        "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*Invalid cassette name '../../escape'*"])
    assert simulator.state.calls == 0
    assert not (pytester.path / "cassettes" / "default").exists()


INTERRUPTED = '''
import pytest
from openai import OpenAI


@pytest.mark.replay
def test_interrupted():
    try:
        OpenAI(max_retries=0).models.list()
    except Exception:
        pass
    raise KeyboardInterrupt


@pytest.mark.replay
def test_never_reached():
    pass
'''


def test_ctrl_c_after_a_miss_stops_the_session(pytester: pytest.Pytester,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_app=INTERRUPTED)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = pytester.runpytest_subprocess("--replay-mode", "replay", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "test_never_reached" not in result.stdout.str()


TRAP = "def test_trap():\n    raise AssertionError('collected from the cassette folder')\n"


@pytest.mark.parametrize("where", ["default", "flag", "environment", "ini", "replay-proxy.toml",
                                   "pyproject.toml"])
def test_collection_skips_the_cassette_folder_wherever_it_is_configured(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # A cassette folder holds a folder per test: walking it is half a second of every run at
    # 1,000 tests, for nothing. A trap below it shows whether the collection went in.
    folder = "cassettes" if where == "default" else "recorded/answers"
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    # A folder per test, as the plugin makes them (a test's cassette is its own folder).
    trap = pytester.path / folder / "test_app" / "test_one"
    trap.mkdir(parents=True)
    (trap / "chat.completions-0123.json").write_text("{}")
    (trap / "test_trap.py").write_text(TRAP)
    ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    args = ["-p", "no:cacheprovider", "--collect-only", "-q"]
    monkeypatch.delenv("REPLAY_PROXY_CASSETTES", raising=False)
    if where == "flag":
        args += ["--replay-cassettes", folder]
    elif where == "environment":
        monkeypatch.setenv("REPLAY_PROXY_CASSETTES", folder)
    elif where == "ini":
        ini += f"replay_cassettes = {folder}\n"
    elif where == "replay-proxy.toml":
        (pytester.path / "replay-proxy.toml").write_text(f'cassettes = "{folder}"\n')
    elif where == "pyproject.toml":
        (pytester.path / "pyproject.toml").write_text(
            f'[tool.replay-proxy]\ncassettes = "{folder}"\n')
    pytester.makeini(ini)
    result = pytester.runpytest(*args)
    assert "test_trap" not in result.stdout.str()
    result.stdout.fnmatch_lines(["test_plain.py::test_one", "1 test collected*"])
    # Named on the command line, the folder is collected as pytest always does.
    named = pytester.runpytest(*args, folder)
    named.stdout.fnmatch_lines(["*test_app/test_one/test_trap.py::test_trap"])


@pytest.mark.parametrize("where", ["test_here.py", "unit/test_here.py"])
def test_a_cassette_folder_that_holds_python_files_is_collected(
        pytester: pytest.Pytester, where: str) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    (pytester.path / "cassettes" / where).parent.mkdir(parents=True)
    (pytester.path / "cassettes" / where).write_text("def test_here():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    result.stdout.fnmatch_lines([f"cassettes/{where}::test_here", "*2 tests collected*"])


@pytest.mark.parametrize("where", ["default", "flag", "environment", "ini", "file", "named file"])
def test_the_plugin_finds_the_cassette_folder_the_proxy_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # The plugin finds it without click, before the proxy starts; the proxy resolves it with
    # every other option. They agree.
    from replay_proxy.tools.configuration import plugin_settings
    from replay_proxy.tools.options import PytestInputs
    from replay_proxy.tools.pytest_plugin import _cassette_folder

    root, invoked, ini_base = tmp_path / "root", tmp_path / "root" / "sub", tmp_path / "ini"
    for folder in (invoked, ini_base):
        folder.mkdir(parents=True)
    for name in ("REPLAY_PROXY_CASSETTES", "REPLAY_PROXY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    args: tuple[str, ...] = ()
    ini: tuple[tuple[str, object], ...] = ()
    if where == "flag":
        args = ("--cassettes", str(tmp_path / "given"))
    elif where == "environment":
        monkeypatch.setenv("REPLAY_PROXY_CASSETTES", "../from-env")
    elif where == "ini":
        ini = (("cassettes", "from-ini"),)
    elif where == "file":
        (root / "pyproject.toml").write_text('[tool.replay-proxy]\ncassettes = "from-file"\n')
    elif where == "named file":
        (tmp_path / "named.toml").write_text('cassettes = "../named-folder"\n')
        monkeypatch.setenv("REPLAY_PROXY_CONFIG", str(tmp_path / "named.toml"))
    inputs = PytestInputs(args, ini, None, str(ini_base), str(invoked), str(root), "run")
    settings, _ = plugin_settings(inputs, {})
    found = _cassette_folder(inputs)
    assert found == Path(os.path.normpath(settings.cassettes))
    assert found != root / "cassettes" or where == "default"


MARK_ONLY = '''
import os

import pytest
from openai import OpenAI

BEFORE = os.environ.get("OPENAI_BASE_URL")


@pytest.fixture
def client():
    return OpenAI()  # built by a fixture of the test's own: the mark's environment is there


@pytest.mark.replay
def test_client_from_a_fixture(client):
    assert client.base_url.host == "127.0.0.1"
    reply = client.chat.completions.create(
        model="gpt-4o-mini", seed=3, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content


@pytest.mark.replay
def test_the_fixture_asked_for_later_is_the_marks_session(request):
    client = OpenAI()
    client.chat.completions.create(
        model="gpt-4o-mini", seed=4, messages=[{"role": "user", "content": "Hello"}])
    replay = request.getfixturevalue("replay_proxy")
    assert str(client.base_url) == replay.base_url + "/"
    assert replay.hits + replay.recordings == 1


def test_unmarked_afterwards_sees_the_environment_as_it_was():
    assert os.environ.get("OPENAI_BASE_URL") == BEFORE


@pytest.mark.replay
@pytest.mark.skip(reason="skipped before any session is opened")
def test_skipped():
    raise AssertionError("never runs")


@pytest.mark.replay
@pytest.mark.parametrize("replay_config", [{"cassettes": "elsewhere"}])
def test_a_parametrized_configuration_is_the_tests(replay_config):
    OpenAI().chat.completions.create(
        model="gpt-4o-mini", seed=5, messages=[{"role": "user", "content": "Where?"}])
'''


def test_the_mark_alone_opens_the_session_before_the_tests_fixtures(
        pytester: pytest.Pytester, simulator: SimulatorThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_mark_only=MARK_ONLY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    recorded = record_run(pytester, simulator, monkeypatch)
    recorded.assert_outcomes(passed=4, skipped=1)
    # (the skipped test is not one of them, and its cassette is not looked at)
    recorded.stdout.fnmatch_lines(["*3 test(s) through the proxy: 0 hit(s), 0 miss(es), "
                                   "3 recording(s) made*"])
    # A replay_config given by parametrize is the test's own, as one from a conftest is.
    assert list((pytester.path / "elsewhere").rglob("chat.completions-*.json"))
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("OPENAI_API_KEY")
    replayed = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    replayed.assert_outcomes(passed=4, skipped=1)
    replayed.stdout.fnmatch_lines(["*3 test(s) through the proxy: 3 hit(s), 0 miss(es)*"])
