"""Every option of `replay-proxy serve` (and `run`), declared once, as plain data.

`configuration` turns this table into click options for the command; the pytest plugin turns it
into `--replay-*` options and `replay_*` ini keys. Importing it imports neither click nor the
server, only constants: the plugin reads it at every pytest start, in suites that never use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.defaults import (
    DEFAULT_CACHE_MB,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_UPSTREAM_TIMEOUT,
    DEFAULT_UPSTREAM_TOTAL_TIMEOUT,
    OPENAI_UPSTREAM,
)
from ..core.modes import Mode

ENV_PREFIX = "REPLAY_PROXY_"
# The API key clients are given when replaying and none is set: no request reaches a provider.
DUMMY_API_KEY = "sk-replay-proxy-dummy"
MODES = tuple(mode.value for mode in Mode)
# The same as server/serving.LOOPS (a test keeps them equal): reading the options must not
# import the server.
LOOPS = ("auto", "uvloop", "asyncio")
# The same as core.routes.SequencePolicy (a test keeps them equal): the route table is not
# needed to read the options.
SEQUENCE_POLICIES = ("stateful", "all", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# How a value is read: a type, and for some a conversion into the Settings value
# (`mode` -> Mode, `timing` -> ReplayTiming, `sequence` -> routes.SequencePolicy, `cassette` -> a
# checked cassette name, `age` -> seconds), done by `configuration`.
Kind = Literal["text", "int", "float", "flag", "path", "choice", "mode", "sequence", "timing",
               "cassette", "age"]


@dataclass(frozen=True)
class OptionSpec:
    """One option. `name` is its parameter name (and, for most, the Settings field it fills);
    `flag` its long flag. Numbers may be bounded (`low`/`high`, `low_open` for a strict bound)."""

    name: str
    flag: str
    help: str
    kind: Kind = "text"
    default: str | int | float | bool | None = None
    choices: tuple[str, ...] = ()
    multiple: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    # A variable read after REPLAY_PROXY_<NAME>, for the value users already have set.
    envvar: str | None = None
    show_default: bool = True
    metavar: str | None = None  # how --help names the value

    @property
    def long_name(self) -> str:
        """`mode` for `--mode`: the configuration key, and the variable's stem."""
        return self.flag[2:]

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.long_name.upper().replace("-", "_")

    @property
    def is_flag(self) -> bool:
        return self.kind == "flag"


SERVE_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("host", "--host", "Address to bind. Anything but loopback requires --auth-token.",
               default="127.0.0.1"),
    OptionSpec("port", "--port",
               "Port to listen on (run: a free port unless given on its command line).",
               kind="int", default=DEFAULT_PORT),
    OptionSpec("mode", "--mode",
               "record: replay hits, record misses; replay: never reach upstream; refresh: "
               "record everything again; passthrough: store nothing; auto: replay when CI is "
               "true, else record.", kind="mode", default="auto", choices=MODES),
    OptionSpec("cassettes", "--cassettes", "Root folder of the cassettes.", kind="path",
               default="cassettes"),
    OptionSpec("default_cassette", "--cassette", "Cassette for requests that name none.",
               kind="cassette", default="default"),
    OptionSpec("openai_upstream", "--openai-upstream",
               "Where OpenAI requests are forwarded when recording.", default=OPENAI_UPSTREAM),
    OptionSpec("azure_upstream", "--azure-upstream",
               "Your Azure OpenAI endpoint, where Azure requests are forwarded.",
               envvar="AZURE_OPENAI_ENDPOINT", show_default=False),
    OptionSpec("store", "--store",
               "Where recordings live: a directory (default: --cassettes), diskcache:PATH or "
               "redis://...", show_default=False),
    OptionSpec("record_errors", "--record-errors",
               "Also store non-2xx answers (never 5xx, 429 or timeouts).", kind="flag",
               default=False, show_default=False),
    OptionSpec("ignore_field", "--ignore-field", "Body field left out of the key (repeatable).",
               multiple=True, show_default=False),
    OptionSpec("match_field", "--match-field",
               "Body field put back into the key, e.g. user (repeatable).", multiple=True,
               show_default=False),
    OptionSpec("match_header", "--match-header",
               "Request header made part of the key (repeatable).", multiple=True,
               show_default=False),
    OptionSpec("mask", "--mask",
               "Replace what changes every run inside the body's strings before keying: "
               "iso-date, iso-datetime, uuid, unix-ts, hex-id, tmp-path, or a regex (repeatable; "
               "'messages[*].content:iso-date' limits it to a path).", multiple=True,
               show_default=False, metavar="[PATH:]NAME_OR_REGEX[=PLACEHOLDER]"),
    OptionSpec("ignore_path", "--ignore-path",
               "Nested body field left out of the key, e.g. metadata.trace_id or "
               "messages[*].name (repeatable).", multiple=True, show_default=False,
               metavar="PATH"),
    OptionSpec("redact", "--redact",
               "Replace matches with [REDACTED] in the key, the stored request and the stored "
               "answers: email, phone, or a regex (repeatable).", multiple=True,
               show_default=False, metavar="NAME_OR_REGEX"),
    OptionSpec("max_age", "--max-age",
               "Recordings older than this (30d, 12h, ...) are stale: record mode records them "
               "again, replay mode still replays them and counts them.", kind="age",
               show_default=False, metavar="AGE"),
    OptionSpec("max_body", "--max-body",
               "Largest request body accepted, in bytes (larger: 413).", kind="int",
               default=DEFAULT_MAX_BODY),
    OptionSpec("fingerprint", "--fingerprint",
               "Which recording to replay: pinned, latest, or a system_fingerprint value.",
               default="pinned"),
    OptionSpec("replay_timing", "--replay-timing",
               "Stream replay pace: none, recorded, or a speed such as 2x.", kind="timing",
               default="none"),
    OptionSpec("inject_seed", "--inject-seed",
               "Add seed N to chat/completions requests without one (changes their key).",
               kind="int", show_default=False),
    OptionSpec("openai_api_key", "--openai-api-key",
               "Key the proxy sends to OpenAI instead of the client's.", envvar="OPENAI_API_KEY",
               show_default=False),
    OptionSpec("azure_api_key", "--azure-api-key",
               "Key the proxy sends to Azure OpenAI instead of the client's.",
               envvar="AZURE_OPENAI_API_KEY", show_default=False),
    OptionSpec("auth_token", "--auth-token",
               "Token clients must present as their API key; required off loopback.",
               show_default=False),
    OptionSpec("upstream_timeout", "--upstream-timeout",
               "Seconds to wait for upstream data before answering 504.", kind="float",
               default=DEFAULT_UPSTREAM_TIMEOUT),
    OptionSpec("upstream_total_timeout", "--upstream-total-timeout",
               "Seconds one upstream call may take in all, answer included (504 past it).",
               kind="float", default=DEFAULT_UPSTREAM_TOTAL_TIMEOUT, low=0, low_open=True),
    OptionSpec("max_answer", "--max-answer",
               "Largest answer stored, in bytes; a larger one is passed through, not stored.",
               kind="int", default=DEFAULT_MAX_ANSWER, low=1),
    OptionSpec("cache_mb", "--cache-mb",
               "Memory for cached entries, replies and miss indexes, in MiB (per worker).",
               kind="int", default=DEFAULT_CACHE_MB, low=0),
    OptionSpec("header_timeout", "--header-timeout",
               "Seconds a client may take to send a request's head; then it is closed.",
               kind="float", default=DEFAULT_HEADER_TIMEOUT, low=0, low_open=True),
    OptionSpec("max_connections", "--max-connections",
               "Open client connections per worker; past it, new ones get a 503.", kind="int",
               default=DEFAULT_MAX_CONNECTIONS, low=1),
    OptionSpec("workers", "--workers",
               "Processes serving the same port (SO_REUSEPORT), sharing the store.", kind="int",
               default=1, low=1, high=64),
    OptionSpec("loop_choice", "--loop", "Event loop: auto takes uvloop when it is installed.",
               kind="choice", default="auto", choices=LOOPS),
    OptionSpec("sequence", "--sequence",
               "Which keys replay their recordings in order (the n-th identical request gets "
               "the n-th answer): stateful routes (files, batches, polls, ...), all routes, or "
               "none.", kind="sequence", default=SEQUENCE_POLICIES[0],
               choices=SEQUENCE_POLICIES),
    OptionSpec("log_level", "--log-level",
               "info: one line per request (method, path, cassette, key, status, ms).",
               kind="choice", default="warning", choices=LOG_LEVELS),
    OptionSpec("log_format", "--log-format", "json: one JSON object per line.", kind="choice",
               default="text", choices=LOG_FORMATS),
)

# run's own options: also valid in the file, where serve and the pytest plugin ignore them.
RUN_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("allow_misses", "--allow-misses",
               "Exit with the command's own code even when requests missed their recording or a "
               "recording could not be stored.", kind="flag", default=False, show_default=False),
)

# How the proxy process runs, not how it answers: not part of Settings.
PROCESS_OPTIONS = frozenset({"host", "port", "workers", "loop_choice", "log_level", "log_format"})
# The options that build Settings.key_policy.
KEY_POLICY_OPTIONS = ("ignore_field", "match_field", "match_header", "mask", "ignore_path",
                      "redact")
# Options the other commands (ls, verify, ...) share with serve, so one file configures them too.
SHARED_OPTIONS = frozenset({"cassettes", "store", "openai_upstream", "azure_upstream",
                            "openai_api_key", "azure_api_key", "max_age", "redact"})
# Credentials come from the environment only: a configuration file is committed.
SECRET_OPTIONS = frozenset({"openai_api_key", "azure_api_key", "auth_token"})
# serve's options that make no sense for a proxy inside pytest: it listens on a free loopback
# port, needs no token, gives each test its own cassette, and logs to a file of its own.
NOT_FOR_PYTEST = frozenset({"host", "port", "workers", "loop_choice", "auth_token",
                            "default_cassette", "log_format"})


@dataclass(frozen=True)
class PytestInputs:
    """Where a pytest session's options come from, gathered without importing click: the
    `--replay-*` flags given (as serve's arguments), the `replay_*` ini values, and the folders
    that relative paths are relative to. `configuration.plugin_settings` turns them, with the
    environment and [tool.replay-proxy], into Settings, in whichever process needs them."""

    args: tuple[str, ...]
    ini: tuple[tuple[str, object], ...]  # (long option name, value) from the ini file
    ini_file: str | None
    ini_base: str
    invocation_dir: str
    rootdir: str
    run_id: str
