"""The `suite` section of scripts/bench: the wall time of a test suite, which is what users feel.

Generated suites of N tests, each one OpenAI call with the real SDK (80% plain, 20% streamed),
in two styles: a client per test (`OpenAI()`, which loads the CA bundle each time) and a shared
one (`OpenAI(http_client=shared)`, where the recorder's own cost shows). Variants, each with only
its own pytest plugin loaded:

- floor: a bare aiohttp low-level server on uvloop returning fixed bytes (no recorder at all);
- serve: the suite pointed at a running `replay-proxy serve`;
- plugin: replay-proxy's pytest plugin (`@pytest.mark.replay`);
- vcrpy: vcrpy with pytest-recording (`@pytest.mark.vcr`);
- cassetter: cassetter's pytest plugin (`@pytest.mark.vcr`).

Each recorder records its suite once against the simulator, then every replay runs offline
(the simulator stopped), as rounds interleaved with the order reversed every other round;
ratios are medians of per-round ratios. Also: record runs (against the simulator, against the
suite sent straight to it), `-n 2` against serial, and what loading the plugin costs a suite
that never uses it. pytest-recording, vcrpy and cassetter live in their own environment,
`.venv-suite`, with replay-proxy and the same openai, pytest and pytest-xdist as `.venv`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("vcrpy", "cassetter", "plugin", "serve", "floor")
RECORDERS = ("direct", "vcrpy", "cassetter", "plugin", "serve")
STYLES = ("per_test", "shared")
LABELS = {"vcrpy": "vcrpy + pytest-recording", "cassetter": "cassetter",
          "plugin": "replay-proxy plugin", "serve": "`replay-proxy serve`",
          "floor": "floor: bare aiohttp returning fixed bytes",
          "direct": "no recorder (straight to the simulator)"}
STYLE_LABELS = {"per_test": "client per test", "shared": "shared client"}
# Each variant runs with the other tools' plugins switched off, as a user of one tool has.
PLUGINS = {"plugin": "replay_proxy", "vcrpy": "recording", "cassetter": "cassetter"}
STREAMED_EVERY = 5  # one test in five streams its answer
PROMPT = "Question {i}: name a colour and say why."

# The floor, and scripts/bench's low-level row: aiohttp's low-level server on uvloop returning fixed
# bytes (argv: port, the plain answer, and optionally the streamed one).
FLOOR_SERVER = """
import asyncio, sys
import uvloop
from aiohttp import web
plain = open(sys.argv[2], "rb").read()
stream = open(sys.argv[3], "rb").read() if len(sys.argv) > 3 else None
async def answer(request):
    body = await request.read()
    if stream is not None and b'"stream":true' in body.replace(b" ", b""):
        return web.Response(body=stream, content_type="text/event-stream")
    return web.Response(body=plain, content_type="application/json")
async def main():
    runner = web.ServerRunner(web.Server(answer, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""

TEST_HEAD = '''
import httpx2
import pytest
from openai import OpenAI

SHARED = httpx2.Client()


def client():
    return {client}


def ask(i, stream):
    messages = [{{"role": "user", "content": "{prompt}".format(i=i)}}]
    if stream:
        chunks = client().chat.completions.create(model="gpt-4o-mini", seed=i, max_tokens=40,
                                                  messages=messages, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks
                       if chunk.choices)
    else:
        text = client().chat.completions.create(model="gpt-4o-mini", seed=i, max_tokens=40,
                                                messages=messages).choices[0].message.content
    assert text
'''

TEST = '''

{mark}def test_{i:05d}():
    ask({i}, {stream})
'''

SERVERS: dict[str, int] = {}  # url -> pid of the servers running, for their CPU time
MARKS = {"plugin": "@pytest.mark.replay\n", "vcrpy": "@pytest.mark.vcr\n",
         "cassetter": "@pytest.mark.vcr\n"}


def write_suite(folder: Path, variant: str, style: str, tests: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Its own rootdir and configuration: nothing of this repository's pytest settings.
    (folder / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    code = TEST_HEAD.format(client="OpenAI(http_client=SHARED)" if style == "shared"
                            else "OpenAI()", prompt=PROMPT)
    mark = MARKS.get(variant, "")
    code += "".join(TEST.format(mark=mark, i=i, stream=i % STREAMED_EVERY == 0)
                    for i in range(tests))
    (folder / "test_suite.py").write_text(code)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited: {process.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {port}") from None
            time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(command: list[str], port: int) -> Iterator[str]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SERVERS[f"http://127.0.0.1:{port}"] = process.pid
    try:
        wait_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Suite:
    """Runs generated suites with the bench environment's pytest."""

    def __init__(self, python: str, work: Path, tests: int) -> None:
        self.python, self.work, self.tests = python, work, tests
        self.environ = {name: value for name, value in os.environ.items()
                        if not name.startswith(("REPLAY_PROXY_", "OPENAI_", "AZURE_OPENAI_"))
                        # Users' machines keep bytecode: every variant imports from it.
                        and name not in ("CI", "PYTHONDONTWRITEBYTECODE")}
        self.environ["OPENAI_API_KEY"] = "sk-bench-suite"
        # CPU seconds of the runs, by variant: pytest and what it started, and the server the
        # suite was pointed at (the floor's, serve's). Steadier than wall time on a busy machine.
        self.cpu: dict[str, list[float]] = {}

    def command(self, variant: str, *extra: str) -> list[str]:
        off = [f"-p no:{plugin}" for name, plugin in PLUGINS.items() if name != variant]
        return [self.python, "-m", "pytest", "-q", *" ".join(off).split(), *extra]

    def run(self, folder: Path, variant: str, *extra: str, base_url: str | None = None,
            expect: int | None = None, cpu_as: str | None = None) -> float:
        environ = dict(self.environ)
        if base_url is not None:
            environ["OPENAI_BASE_URL"] = base_url
        server = next((pid for url, pid in SERVERS.items()
                       if base_url is not None and base_url.startswith(url)), None)
        serving = cpu_seconds(server) if server is not None and variant in ("floor", "serve") \
            else 0.0
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(self.command(variant, *extra), cwd=folder, env=environ,
                              capture_output=True, text=True, timeout=1800)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if cpu_as is not None:
            used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if server is not None and variant in ("floor", "serve"):
                used += cpu_seconds(server) - serving
            self.cpu.setdefault(cpu_as, []).append(used)
        print(f"  suite: {folder.relative_to(self.work)} {' '.join(extra)}: {elapsed:.2f} s",
              file=sys.stderr, flush=True)
        passed = re.search(r"(\d+) passed", done.stdout)
        wanted = self.tests if expect is None else expect
        if done.returncode != 0 or passed is None or int(passed.group(1)) != wanted:
            raise RuntimeError(f"{variant} in {folder} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
        return elapsed


def record_args(variant: str, simulator: str) -> tuple[list[str], str | None]:
    """(pytest arguments, OPENAI_BASE_URL) of a record run."""
    if variant == "plugin":
        return ["--replay-mode", "record", "--replay-openai-upstream", simulator], None
    if variant in ("vcrpy", "cassetter"):
        return ["--record-mode=once"], simulator + "/v1"
    return [], simulator + "/v1"  # direct


def replay_args(variant: str) -> list[str]:
    if variant == "plugin":
        return ["--replay-mode", "replay"]
    if variant in ("vcrpy", "cassetter"):
        return ["--record-mode=none"]
    return []


def answers(simulator: str, folder: Path) -> tuple[Path, Path]:
    """The simulator's answers to one plain and one streamed question: the floor's bytes."""
    import urllib.request

    files = []
    for stream in (False, True):
        body: dict[str, Any] = {"model": "gpt-4o-mini", "seed": 5, "max_tokens": 40,
                                "messages": [{"role": "user", "content": PROMPT.format(i=5)}]}
        if stream:
            body["stream"] = True
        request = urllib.request.Request(
            simulator + "/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            path = folder / f"floor-{'stream' if stream else 'plain'}.bin"
            path.write_bytes(answer.read())
            files.append(path)
    return files[0], files[1]


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for number in range(rounds):
        for name in order if number % 2 == 0 else reversed(order):
            samples[name].append(runs[name]())
    return samples


def paired(samples: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples[base], strict=True))


def measure_suite(work: Path, tests: int, rounds: int, main_python: str,
                  suite_python: str) -> dict[str, Any]:
    suite = Suite(suite_python, work, tests)
    sim_port, floor_port, serve_port = free_port(), free_port(), free_port()
    simulator_command = [main_python, "-m", "replay_proxy", "simulate", "--port", str(sim_port)]
    folders = {(style, variant): work / "replay" / style / variant
               for style in STYLES for variant in VARIANTS}
    for (style, variant), folder in folders.items():
        write_suite(folder, variant, style, tests)
    serve_cassettes = work / "serve-cassettes"
    serve_record = [suite_python, "-m", "replay_proxy", "serve", "--port", str(serve_port),
                    "--cassettes", str(serve_cassettes)]
    with server(simulator_command, sim_port) as simulator:
        plain, stream = answers(simulator, work)
        # Each recorder records its suites once; the serve variant records through a proxy.
        for (_style, variant), folder in folders.items():
            if variant in ("plugin", "vcrpy", "cassetter"):
                args, base_url = record_args(variant, simulator)
                suite.run(folder, variant, *args, base_url=base_url)
        with server([*serve_record, "--mode", "record", "--openai-upstream", simulator],
                    serve_port) as proxy:
            suite.run(folders[("shared", "serve")], "serve", base_url=proxy + "/c/suite/v1")
        record = measure_record(suite, work, simulator, rounds, serve_record, serve_port)
    # Offline from here on: the simulator is stopped.
    floor_command = [main_python, "-c", FLOOR_SERVER, str(floor_port), str(plain), str(stream)]
    serve_replay = [*serve_record, "--mode", "replay"]
    with server(floor_command, floor_port) as floor, server(serve_replay, serve_port) as proxy:
        # vcrpy and cassetter match the host they recorded: the simulator's, now closed.
        bases = {"floor": floor + "/v1", "serve": proxy + "/c/suite/v1",
                 "vcrpy": simulator + "/v1", "cassetter": simulator + "/v1"}

        def replay(style: str, variant: str, *extra: str, cpu_as: str | None = None
                   ) -> Callable[[], float]:
            return lambda: suite.run(folders[(style, variant)], variant,
                                     *replay_args(variant), *extra,
                                     base_url=bases.get(variant), cpu_as=cpu_as)

        for (style, variant) in folders:  # warm up: bytecode, caches, the page cache
            replay(style, variant)()
        runs = {f"{style}/{variant}": replay(style, variant, cpu_as=f"{style}/{variant}")
                for style in STYLES for variant in VARIANTS}
        samples = interleaved(runs, rounds)
        parallel_runs: dict[str, Callable[[], float]] = {}
        for variant in VARIANTS:
            parallel_runs[f"serial/{variant}"] = replay("shared", variant)
            parallel_runs[f"n2/{variant}"] = replay("shared", variant, "-n", "2")
        parallel = interleaved(parallel_runs, rounds)
    load = measure_plugin_load(suite, work, rounds)
    return summarise(tests, rounds, samples, parallel, record, load, suite.cpu)


def measure_record(suite: Suite, work: Path, simulator: str, rounds: int,
                   serve_record: list[str], serve_port: int) -> dict[str, list[float]]:
    """Record runs into fresh folders, against the suite sent straight to the simulator."""
    counter = iter(range(1_000_000))

    def one(variant: str) -> float:
        folder = work / "record" / f"{variant}-{next(counter)}"
        write_suite(folder, "serve" if variant == "direct" else variant, "shared", suite.tests)
        try:
            if variant == "serve":
                command = [*serve_record[:-1], str(folder / "cassettes"), "--mode", "record",
                           "--openai-upstream", simulator]
                with server(command, serve_port) as proxy:
                    return suite.run(folder, "serve", base_url=proxy + "/c/suite/v1")
            args, base_url = record_args(variant, simulator)
            return suite.run(folder, variant, *args, base_url=base_url)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    one("direct")  # warm up
    return interleaved({variant: (lambda variant=variant: one(variant))
                        for variant in RECORDERS}, rounds)


TRIVIAL = "".join(f"\ndef test_{i:04d}():\n    assert {i} >= 0\n" for i in range(200))


def measure_plugin_load(suite: Suite, work: Path, rounds: int) -> dict[str, float]:
    """What a suite that never uses the plugin pays for having it installed: 200 trivial tests
    with the plugin loaded and with `-p no:replay_proxy`, interleaved; and -X importtime."""
    folder = work / "trivial"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (folder / "test_trivial.py").write_text(TRIVIAL)
    others = ["-p", "no:recording", "-p", "no:cassetter"]

    cpu: dict[str, list[float]] = {"loaded": [], "off": []}

    def run(*extra: str) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([suite.python, "-m", "pytest", "-q", *others, *extra], cwd=folder,
                       env=suite.environ, capture_output=True, check=True)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["off" if extra else "loaded"].append(after.ru_utime - before.ru_utime
                                                 + after.ru_stime - before.ru_stime)
        return elapsed

    run()
    cpu["loaded"].clear()
    # Pairs, many of them: the cost is a few milliseconds in half a second that swings by more.
    samples = interleaved({"loaded": run, "off": lambda: run("-p", "no:replay_proxy")},
                          max(20, rounds * 8))
    timing = subprocess.run(
        [suite.python, "-X", "importtime", "-c",
         "import pytest, importlib; import replay_proxy.tools.pytest_plugin"],
        env=suite.environ, capture_output=True, text=True, check=True).stderr
    found = re.search(r"\|\s+(\d+) \| replay_proxy\.tools\.pytest_plugin$", timing,
                      re.MULTILINE)
    return {"loaded_s": statistics.median(samples["loaded"]),
            "off_s": statistics.median(samples["off"]),
            "cost_ms": statistics.median(a - b for a, b in zip(samples["loaded"], samples["off"],
                                                                 strict=True)) * 1000,
            "cpu_cost_ms": statistics.median(a - b for a, b in zip(cpu["loaded"], cpu["off"],
                                                                   strict=True)) * 1000,
            "importtime_ms": int(found.group(1)) / 1000 if found else float("nan")}


def summarise(tests: int, rounds: int, samples: dict[str, list[float]],
              parallel: dict[str, list[float]], record: dict[str, list[float]],
              load: dict[str, float], cpu: dict[str, list[float]]) -> dict[str, Any]:
    result: dict[str, Any] = {"tests": tests, "rounds": rounds, "styles": {}, "xdist": {},
                              "record": {}, "plugin_load": load}
    for style in STYLES:
        rows: dict[str, Any] = {}
        mine = {variant: samples[f"{style}/{variant}"] for variant in VARIANTS}
        for variant in VARIANTS:
            rows[variant] = {
                "median_s": statistics.median(mine[variant]), "samples": mine[variant],
                "vs_floor": paired(mine, variant, "floor"),
                "vs_vcrpy": paired(mine, variant, "vcrpy"),
                "vs_cassetter": paired(mine, variant, "cassetter"),
                "ms_per_test_over_floor": statistics.median(
                    (a - b) / tests * 1000 for a, b in zip(mine[variant], mine["floor"],
                                                          strict=True)),
                "cpu_s": statistics.median(cpu[f"{style}/{variant}"]),
                "cpu_ms_per_test_over_floor": statistics.median(
                    (a - b) / tests * 1000 for a, b in zip(cpu[f"{style}/{variant}"],
                                                          cpu[f"{style}/floor"], strict=True))}
        result["styles"][style] = rows
    for variant in VARIANTS:
        serial, n2 = parallel[f"serial/{variant}"], parallel[f"n2/{variant}"]
        result["xdist"][variant] = {"serial_s": statistics.median(serial),
                                    "n2_s": statistics.median(n2),
                                    "n2_vs_serial": paired({"a": n2, "b": serial}, "a", "b")}
    for variant in RECORDERS:
        result["record"][variant] = {
            "median_s": statistics.median(record[variant]), "samples": record[variant],
            "ms_per_test_over_direct": statistics.median(
                (a - b) / tests * 1000 for a, b in zip(record[variant], record["direct"],
                                                      strict=True))}
    return result


def markdown_suite(suite: dict[str, Any]) -> list[str]:
    tests, shown = suite["tests"], [*VARIANTS]
    head = "| " + " | ".join(LABELS[name] for name in shown) + " |"
    rule = "|---" * (len(shown) + 1) + "|"
    lines = [f"## Test-suite wall time (N={tests:,} tests, {suite['rounds']} rounds)", "",
             f"Seconds of `pytest` for a suite of {tests} tests, each one OpenAI call with the "
             "real SDK (20% streamed), replayed offline; medians, and ratios as medians of "
             "per-round ratios.", "",
             f"| N={tests}, seconds {head}", rule]
    for style in STYLES:
        rows = suite["styles"][style]
        lines.append(f"| {STYLE_LABELS[style]} | " + " | ".join(
            f"{rows[name]['median_s']:.2f}" for name in shown) + " |")
    shared = suite["styles"]["shared"]
    for key, label, fmt in (("ms_per_test_over_floor", "ms per test over the floor (shared)",
                             "{:+.2f}"),
                            ("vs_floor", "vs the floor (shared)", "{:.2f}x"),
                            ("vs_vcrpy", "vs vcrpy (shared)", "{:.2f}x"),
                            ("vs_cassetter", "vs cassetter (shared)", "{:.2f}x")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(shared[name][key])
                                                  for name in shown) + " |")
    lines.append("| CPU seconds, every process (shared) | " + " | ".join(
        f"{shared[name]['cpu_s']:.2f}" for name in shown) + " |")
    lines.append("| CPU ms per test over the floor (shared) | " + " | ".join(
        f"{shared[name]['cpu_ms_per_test_over_floor']:+.2f}" for name in shown) + " |")
    per_test = suite["styles"]["per_test"]
    lines.append("| vs the floor (client per test) | " + " | ".join(
        f"{per_test[name]['vs_floor']:.2f}x" for name in shown) + " |")
    xdist = suite["xdist"]
    lines.append("| `-n 2` / serial (shared) | " + " | ".join(
        f"{xdist[name]['n2_vs_serial']:.2f}" for name in shown) + " |")
    record = suite["record"]
    lines += ["", "| record run (shared client) | " + " | ".join(
        LABELS[name] for name in RECORDERS) + " |", "|---" * (len(RECORDERS) + 1) + "|",
        "| seconds | " + " | ".join(f"{record[name]['median_s']:.2f}" for name in RECORDERS)
        + " |",
        "| ms per test over no recorder | " + " | ".join(
            f"{record[name]['ms_per_test_over_direct']:+.2f}" for name in RECORDERS) + " |"]
    load = suite["plugin_load"]
    lines += ["", f"Loading the plugin in a suite that never uses it (200 trivial tests, "
              f"with the plugin and with `-p no:replay_proxy`, interleaved): "
              f"{load['cost_ms']:+.1f} ms of wall time per pytest start (median of pairs; "
              f"{load['loaded_s']:.3f} s against {load['off_s']:.3f} s), "
              f"{load.get('cpu_cost_ms', float('nan')):+.1f} ms of CPU time; "
              f"`python -X importtime`: {load['importtime_ms']:.1f} ms for "
              "`replay_proxy.tools.pytest_plugin` and what it imports.", ""]
    return lines


if __name__ == "__main__":  # for a quick look: python scripts/bench_suite.py N ROUNDS
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with tempfile.TemporaryDirectory(prefix=".bench-suite-", dir=ROOT) as temporary:
        measured = measure_suite(Path(temporary), count, rounds, sys.executable,
                                 str(ROOT / ".venv-suite" / "bin" / "python"))
    print(json.dumps(measured, indent=2))
    print("\n".join(markdown_suite(measured)))
