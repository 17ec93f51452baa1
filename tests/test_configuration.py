"""One configuration: [tool.replay-proxy] / replay-proxy.toml, REPLAY_PROXY_* variables, flags.

Precedence is checked through the real command: `replay-proxy run` starts a proxy from the
options and the command it runs asks that proxy for its health (mode, store).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from replay_proxy.core.modes import Mode
from replay_proxy.server import serving
from replay_proxy.tools.configuration import (
    ConfigError,
    checked_defaults,
    find_config,
    serve_parameters,
    settings_from,
    unplumbed,
)

ROOT = Path(__file__).resolve().parent.parent
HEALTH = ("import json, os, urllib.request; "
          "print(json.dumps(json.load(urllib.request.urlopen("
          "os.environ['REPLAY_PROXY_URL'] + '/_replay/health'))))")


def replay_proxy(*args: str, cwd: Path, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith("REPLAY_PROXY_") and name != "CI"}
    return subprocess.run([sys.executable, "-m", "replay_proxy", *args], cwd=cwd, text=True,
                          capture_output=True, env={**environ, **(env or {})}, timeout=60)


def health_under(*args: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    result = replay_proxy("run", *args, "--", sys.executable, "-c", HEALTH, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    health: dict[str, str] = json.loads(result.stdout)
    return health


def test_every_serve_option_reaches_the_settings_or_the_process() -> None:
    # An option added to serve but to neither Settings nor the process would be silently lost.
    assert unplumbed(serve_parameters()) == []
    assert tuple(
        next(p for p in serve_parameters() if p.name == "loop_choice").type.choices) == serving.LOOPS  # type: ignore[attr-defined]
    from replay_proxy.core.routes import SequencePolicy
    from replay_proxy.tools.options import SEQUENCE_POLICIES

    assert tuple(policy.value for policy in SequencePolicy) == SEQUENCE_POLICIES
    assert SEQUENCE_POLICIES[0] == SequencePolicy.STATEFUL


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "tests" / "unit").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "app"\n\n[tool.replay-proxy]\nmode = "passthrough"\n'
        'store = "diskcache:.cache/replays"\n')
    here = project / "tests" / "unit"  # the file is found by walking up

    assert health_under(cwd=tmp_path)["mode"] == "record"  # no file: auto, and CI unset
    from_file = health_under(cwd=here)
    assert from_file["mode"] == "passthrough"
    # A relative path in the file is relative to the file's folder, not the working directory.
    assert str(project / ".cache" / "replays") in from_file["store"]
    assert not (here / ".cache").exists()
    from_env = health_under(cwd=here, env={"REPLAY_PROXY_MODE": "replay"})
    assert from_env["mode"] == "replay" and "replays" in from_env["store"]
    from_flag = health_under("--mode", "refresh", cwd=here, env={"REPLAY_PROXY_MODE": "replay"})
    assert from_flag["mode"] == "refresh"


def test_replay_proxy_toml_and_config_option(tmp_path: Path) -> None:
    (tmp_path / "replay-proxy.toml").write_text('mode = "replay"\n')
    (tmp_path / "cassettes").mkdir()  # replay mode starts only on a folder that exists
    assert health_under(cwd=tmp_path)["mode"] == "replay"
    other = tmp_path / "ci.toml"
    other.write_text('[tool.replay-proxy]\nmode = "passthrough"\n')
    assert health_under(cwd=tmp_path, env={"REPLAY_PROXY_CONFIG": str(other)})["mode"] == \
        "passthrough"
    result = replay_proxy("--config", str(other), "run", "--", sys.executable, "-c", HEALTH,
                          cwd=tmp_path)
    assert json.loads(result.stdout)["mode"] == "passthrough"


@pytest.mark.parametrize(("table", "named"), [
    ('mode = "replay"\nignore_feild = ["user"]\n', "'ignore_feild'"),
    ('mode = "bogus"\n', "'mode'"),
    ('ignore-field = "user"\nmax_body = "big"\n', "'max_body'"),
    ('openai_api_key = "sk-committed"\n', "REPLAY_PROXY_OPENAI_API_KEY"),
    ('ignore_field = [\n', "not valid TOML"),
])
def test_a_bad_file_is_a_usage_error_naming_the_file_and_the_key(
        tmp_path: Path, table: str, named: str) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.replay-proxy]\n{table}")
    commands = (["serve"], ["run", "--", "true"], ["ls"]) if "feild" in table else (["serve"],)
    for command in commands:
        result = replay_proxy(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert str(tmp_path / "pyproject.toml") in result.stderr
        assert named in result.stderr
        assert "Traceback" not in result.stderr


def test_keys_take_dashes_or_underscores_and_repeatable_options_take_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "replay-proxy.toml").write_text(
        'ignore_field = ["service_tier", "parallel_tool_calls"]\nmatch-header = "OpenAI-Beta"\n'
        'record-errors = true\nreplay_timing = "2x"\nmax-body = 1024\ncassettes = "recs"\n')
    config = find_config(tmp_path)
    assert config is not None
    params = serve_parameters()
    defaults = checked_defaults(params, config.values, config.where, config.path.parent)
    command = click.Command("serve", params=params)
    monkeypatch.delenv("REPLAY_PROXY_IGNORE_FIELD", raising=False)
    resolved = command.make_context("serve", [], default_map=defaults).params
    settings = settings_from(resolved)
    assert {"service_tier", "parallel_tool_calls"} <= settings.key_policy.ignored_fields
    assert "openai-beta" in settings.key_policy.matched_headers
    assert settings.record_errors is True and settings.replay_timing.speed == 2.0
    assert settings.max_body == 1024 and settings.cassettes == tmp_path.resolve() / "recs"

    # The environment: space-separated for a repeatable option; a flag still wins over it.
    monkeypatch.setenv("REPLAY_PROXY_IGNORE_FIELD", "temperature top_p")
    monkeypatch.setenv("REPLAY_PROXY_MODE", "replay")
    from_env = settings_from(command.make_context("serve", [], default_map=defaults).params)
    assert {"temperature", "top_p"} <= from_env.key_policy.ignored_fields
    assert "service_tier" not in from_env.key_policy.ignored_fields and from_env.mode is Mode.REPLAY
    flagged = command.make_context("serve", ["--ignore-field", "n", "--mode", "record"],
                                   default_map=defaults).params
    assert flagged["ignore_field"] == ("n",) and flagged["mode"] is Mode.RECORD


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        checked_defaults(serve_parameters(), {"casettes": "x"}, "somewhere", tmp_path)
    assert "unknown key 'casettes'" in error.value.message
    assert "cassettes" in error.value.message.split("options:")[1]


def test_other_commands_read_the_shared_options(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "cassettes" / "tour", tmp_path / "recs" / "tour")
    (tmp_path / "pyproject.toml").write_text('[tool.replay-proxy]\ncassettes = "recs"\n'
                                             'mode = "replay"\n')
    (tmp_path / "src").mkdir()
    listed = replay_proxy("ls", "--json", cwd=tmp_path / "src")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {row["cassette"] for row in rows} == {"tour"}
    by_env = replay_proxy("ls", "--json", cwd=tmp_path / "src",
                          env={"REPLAY_PROXY_CASSETTES": str(tmp_path / "nothing")})
    assert by_env.returncode == 2  # the variable beat the file, and names no folder
    assert f"--cassettes {tmp_path / 'nothing'}: no such folder" in by_env.stderr


def test_run_options_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "replay-proxy.toml").write_text('mode = "replay"\nallow-misses = true\n')
    (tmp_path / "cassettes").mkdir()
    missing = ("import os, urllib.request, urllib.error\ntry:\n"
               "    urllib.request.urlopen(os.environ['OPENAI_BASE_URL'] + '/models')\n"
               "except urllib.error.HTTPError as error:\n    print(error.code)")
    result = replay_proxy("run", "--", sys.executable, "-c", missing, cwd=tmp_path)
    assert result.stdout.strip() == "404" and "1 miss" in result.stderr
    assert result.returncode == 0  # allowed by the file
    strict = replay_proxy("run", "--", sys.executable, "-c", missing, cwd=tmp_path,
                          env={"REPLAY_PROXY_ALLOW_MISSES": "false"})
    assert strict.returncode == 1  # the environment beats the file
