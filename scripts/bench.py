"""Side-by-side benchmarks of replay-proxy, run by `scripts/bench`.

Everything runs on loopback in one invocation, with the same recorded response bytes, as
rounds interleaved A B A B so that the machine's noise falls on every server alike:

1. the limit: a bare aiohttp server returning the recorded response from memory (and the same
   on aiohttp's low-level server and uvloop, the machinery replay-proxy runs on);
2. replay-proxy replay hits on the directory store and the diskcache store (and --workers 2);
3. record-mode overhead over calling the simulator directly;
4. streaming replay of a 200-event response: time to first and last event vs the simulator;
5. mitmproxy's server replay of the same exchange, the best-known peer;
6. scale: a cassette of 100,000 recordings against one of 100, start-up time and RSS;
7. sse: the stream splitter alone, in-process, on one huge event fed in small chunks
   (`--only sse` needs no servers);
8. fleet: two proxies on one three-node Redis Cluster against one proxy on one Redis: hit
   throughput, first-hit latency (the store read), and upstream calls for a burst of
   identical misses spread over the proxies (single-flight across them);
9. misses: replay misses on a cassette of 25,000 keys (the nearest recording is named in
   each), and how long /_replay/health waits meanwhile (`--only misses` needs no wrk);
10. suite: what users feel, the wall time of a test suite: generated suites of N tests with the
   real openai SDK through the pytest plugin, `replay-proxy serve`, vcrpy + pytest-recording,
   cassetter, and a bare server returning fixed bytes (`scripts/bench_suite.py`; `--only suite`
   needs no wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bench_suite
import orjson
from replay_proxy.core.canonical import IncomingRequest, KeyPolicy, canonical_request, request_key
from replay_proxy.core.cassette import Entry, Recording, encode_entry
from replay_proxy.core.providers import parse_route
from replay_proxy.tools.testing import free_port, run_redis, run_redis_cluster

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SECTIONS = ["throughput", "record", "streaming", "scale", "sse", "fleet", "misses", "suite"]
PROMPT = "Summarise the plot of a long novel in plain words."
NAIVE_FORWARDER = """
import sys
import aiohttp
from aiohttp import web
upstream = sys.argv[2]
async def session(app):
    app["session"] = aiohttp.ClientSession()
    yield
    await app["session"].close()
async def forward(request):
    body = await request.read()
    async with request.app["session"].post(upstream + request.path, data=body,
                                           headers={"Content-Type": "application/json",
                                                    "Authorization": "Bearer sk-bench"}) as answer:
        data = await answer.read()
    return web.Response(body=data, status=answer.status, content_type="application/json")
app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_post("/{tail:.*}", forward)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
BARE_SERVER = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def answer(request):
    await request.read()
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
# The same bytes on the machinery replay-proxy itself runs on: aiohttp's low-level server, uvloop.
BARE_LOWLEVEL = bench_suite.FLOOR_SERVER


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> float:
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited: {process.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return time.monotonic() - started
        except OSError:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"nothing listening on {port}") from None
            time.sleep(0.005)


class Server:
    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name, self.command, self.port = name, command, port
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        spawned = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd=ROOT)
        wait_port(self.port, self.process)
        self.startup_s = time.monotonic() - spawned
        return self

    def rss_mb(self) -> float:
        assert self.process is not None
        total = 0
        pids = [self.process.pid, *_children(self.process.pid)]
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(match.group(1)) if match else 0
        return total / 1024

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the server and its worker processes."""
        assert self.process is not None
        total = 0.0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(line) for line in out.split()]


@contextmanager
def running(*servers: Server) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


def proxy_command(port: int, *args: str) -> list[str]:
    return [PY, "-m", "replay_proxy", "serve", "--port", str(port), *args]


def chat_body(seed: int, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "seed": seed, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def http_post(port: int, path: str, body: bytes, connection: Any = None) -> tuple[int, bytes, Any]:
    import http.client

    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   "Authorization": "Bearer sk-bench"})
    response = conn.getresponse()
    return response.status, response.read(), conn


# ---- measurements ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, body: bytes, duration: float, connections: int) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body.decode())}\n")
    seconds = max(1, round(duration))  # wrk takes whole seconds
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                              "-s", str(script), url], capture_output=True, text=True,
                             check=True).stdout
    finally:
        script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    result = {"rps": rps}
    for label, name in (("50%", "p50_ms"), ("99%", "p99_ms")):
        match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)\b", out)
        result[name] = float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} failed responses\n{out}")
    return result


def interleave(runs: dict[str, Callable[[], dict[str, float]]], rounds: int
               ) -> dict[str, dict[str, float]]:
    """Every run once per round, the order reversed every other round (A B C, C B A, ...)."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    order = list(runs)
    for round_number in range(rounds):
        for name in order if round_number % 2 == 0 else reversed(order):
            samples[name].append(runs[name]())
    return {name: {metric: statistics.median(s[metric] for s in results)
                   for metric in results[0]} | {"samples": results}  # type: ignore[dict-item]
            for name, results in samples.items()}


def paired_ratio(samples: dict[str, dict[str, Any]], name: str, base: str) -> float:
    """Median over rounds of name/base requests/s, each pair measured back to back."""
    pairs = zip(samples[name]["samples"], samples[base]["samples"], strict=True)
    return statistics.median(a["rps"] / b["rps"] for a, b in pairs)


def stream_times(port: int, path: str, body: bytes) -> tuple[float, float]:
    """(time to first event, time to last event) in ms, over a fresh connection."""
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer sk-bench\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        first = None
        seen = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            seen += chunk
            if first is None and b"data: " in seen:
                first = time.perf_counter()
            if b"data: [DONE]" in seen:
                break
        last = time.perf_counter()
    assert first is not None and b"[DONE]" in seen
    return (first - started) * 1000, (last - started) * 1000


def sequential_ms(port: int, path: str, bodies: list[bytes]) -> list[float]:
    times = []
    connection = None
    for body in bodies:
        started = time.perf_counter()
        status, _, connection = http_post(port, path, body, connection)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
    return times


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ---- fixtures --------------------------------------------------------------------------------

def record_fixtures(work: Path, simulator: Server) -> dict[str, Any]:
    """Record the 1.5 KB answer and the 200-event stream through replay-proxy."""
    port = free_port()
    recorder = Server("recorder", proxy_command(port, "--mode", "record", "--cassettes",
                                                str(work / "cassettes"), "--openai-upstream",
                                                simulator.url), port)
    with running(recorder):
        max_tokens = 100
        while True:
            status, answer, _ = http_post(port, "/c/bench/v1/chat/completions",
                                          chat_body(42, max_tokens))
            assert status == 200, answer
            if len(answer) >= 1500:
                break
            max_tokens += 20
        status, stream, _ = http_post(port, "/c/bench/v1/chat/completions",
                                      chat_body(42, 197, stream=True))
        events = stream.count(b"\n\n")
    (work / "answer.json").write_bytes(answer)
    return {"max_tokens": max_tokens, "answer_bytes": len(answer), "stream_events": events}


def build_scale_cassettes(root: Path, template: Recording, sizes: dict[str, int]) -> None:
    """Cassettes of N recordings, each a real key (seed i) so that every one can be hit."""
    route = parse_route("/v1/chat/completions", {})
    assert route is not None
    headers = {"content-type": "application/json"}
    for name, count in sizes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for seed in range(count):
            incoming = IncomingRequest("POST", route, (), headers, chat_body(seed, 8))
            canonical = canonical_request(incoming, KeyPolicy())
            key = request_key(canonical)
            entry = Entry(key, route.label, canonical).add(template)
            (folder / f"{route.label}-{key}.json").write_bytes(encode_entry(entry))


# ---- the run ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--scale", type=int, default=100_000, help="recordings in the big cassette")
    parser.add_argument("--miss-keys", type=int, default=25_000,
                        help="recordings in the cassette of the misses section")
    parser.add_argument("--suite-tests", type=int, default=1000,
                        help="tests in each generated suite of the suite section")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 1 s runs, 10k recordings, suites of 300 tests")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a replay-proxy under load with py-spy")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--only", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="run only these sections")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.scale, args.suite_tests = 1, 1.0, 10_000, 300
    if args.only == ["sse"]:  # in-process: no servers, and the saved results stay as they are
        print("\n".join(markdown_sse(measure_sse())))
        return 0
    if args.only == ["misses"]:  # no wrk, no simulator; the saved results stay as they are
        with tempfile.TemporaryDirectory(prefix=".bench-", dir=ROOT) as temporary:
            print("\n".join(markdown_misses(measure_misses(Path(temporary), args))))
        return 0
    if args.only == ["suite"]:  # no wrk; its results are saved beside the others'
        with tempfile.TemporaryDirectory(prefix=".bench-", dir=ROOT) as temporary:
            suite = run_suite(Path(temporary), args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "suite.json").write_text(json.dumps(
            {"command": "scripts/bench " + " ".join(sys.argv[1:]), **suite}, indent=2) + "\n")
        report = "\n".join(bench_suite.markdown_suite(suite)) + "\n"
        (args.out / "suite.md").write_text(report)
        print(report)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk (scripts/bench installs it)", file=sys.stderr)
        return 2
    mitmdump = os.environ.get("REPLAY_BENCH_MITMDUMP") or shutil.which("mitmdump")
    results: dict[str, Any] = {
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {"rounds": args.rounds, "duration_s": args.duration,
                     "connections": args.connections, "scale": args.scale},
    }
    # Inside the checkout, where cassettes live: file creation costs differ a lot between disks.
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=ROOT) as temporary:
        work = Path(temporary)
        sim_port = free_port()
        simulator = Server("simulator", [PY, "-m", "replay_proxy", "simulate", "--port",
                                         str(sim_port)], sim_port)
        with running(simulator), run_redis() as redis_url:
            args.redis_url = redis_url
            results["fixture"] = record_fixtures(work, simulator)
            for target in (f"diskcache:{work / 'diskcache'}", args.redis_url):
                subprocess.run([PY, "-m", "replay_proxy", "export", "--from", str(work / "cassettes"),
                                "--to", target], check=True, capture_output=True)
            body = chat_body(42, results["fixture"]["max_tokens"])
            path = "/c/bench/v1/chat/completions"
            if "throughput" in args.only:
                results["throughput"] = measure_throughput(work, simulator, body, path, args,
                                                           mitmdump)
            if "record" in args.only:
                results["record"] = measure_record(work, simulator, args)
            if "streaming" in args.only:
                results["streaming"] = measure_streaming(work, simulator, args)
            if "scale" in args.only:
                results["scale"] = measure_scale(work, body, args)
            if "sse" in args.only:
                results["sse"] = measure_sse()
            if "fleet" in args.only:
                results["fleet"] = measure_fleet(work, simulator, body, path, args)
            if "misses" in args.only:
                results["misses"] = measure_misses(work, args)
            if args.profile:
                results["profile"] = profile_replay(work, body, path, args)
        if "suite" in args.only:  # with the machine to itself: no simulator, no Redis
            results["suite"] = run_suite(work / "suite", args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (args.out / "results.md").write_text(report)
    print(report)
    return 0


def run_suite(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = os.environ.get("REPLAY_BENCH_SUITE_PYTHON") or str(ROOT / ".venv-suite" / "bin"
                                                                  / "python")
    if not Path(python).exists():
        raise SystemExit(f"{python} is missing: scripts/bench installs vcrpy, pytest-recording "
                         "and cassetter there")
    work.mkdir(parents=True, exist_ok=True)
    return bench_suite.measure_suite(work, args.suite_tests, args.rounds, PY, python)


def measure_throughput(work: Path, simulator: Server, body: bytes, path: str,
                       args: argparse.Namespace, mitmdump: str | None) -> dict[str, Any]:
    ports = {name: free_port() for name in
             ("bare", "lowlevel", "directory", "diskcache", "redis", "workers2", "peer")}
    cassettes = str(work / "cassettes")
    servers = {
        "bare": Server("bare", [PY, "-c", BARE_SERVER, str(ports["bare"]),
                                str(work / "answer.json")], ports["bare"]),
        "lowlevel": Server("lowlevel", [PY, "-c", BARE_LOWLEVEL, str(ports["lowlevel"]),
                                        str(work / "answer.json")], ports["lowlevel"]),
        "directory": Server("directory", proxy_command(
            ports["directory"], "--mode", "replay", "--cassettes", cassettes), ports["directory"]),
        "diskcache": Server("diskcache", proxy_command(
            ports["diskcache"], "--mode", "replay", "--cassettes", cassettes,
            "--store", f"diskcache:{work / 'diskcache'}"), ports["diskcache"]),
        "redis": Server("redis", proxy_command(
            ports["redis"], "--mode", "replay", "--cassettes", cassettes,
            "--store", args.redis_url), ports["redis"]),
        "workers2": Server("workers2", proxy_command(
            ports["workers2"], "--mode", "replay", "--cassettes", cassettes, "--workers", "2"),
            ports["workers2"]),
    }
    peer_note = None
    if mitmdump and Path(mitmdump).exists():
        flows = work / "peer.flows"
        record_port = free_port()
        recorder = Server("peer-record", [mitmdump, "-q", "--mode",
                                          f"reverse:{simulator.url}", "-p", str(record_port),
                                          "-w", str(flows)], record_port)
        with running(recorder):
            status, _, _ = http_post(record_port, path.replace("/c/bench", ""), body)
            assert status == 200
        servers["peer"] = Server("peer", [
            mitmdump, "-q", "--mode", f"reverse:{simulator.url}", "-p", str(ports["peer"]),
            "--server-replay", str(flows), "--set", "server_replay_reuse=true",
            "--set", "server_replay_extra=404"], ports["peer"])
    else:
        peer_note = "mitmproxy not installed"
    urls = {name: server.url + (path.replace("/c/bench", "")
                                if name in ("bare", "lowlevel", "peer")
                                else path) for name, server in servers.items()}
    for server in servers.values():
        server.start()
    try:
        time.sleep(1.0)  # every worker listening
        for name in servers:  # warm up: first hits read the store
            wrk(urls[name], body, 0.5, args.connections)
        def run(name: str) -> dict[str, float]:
            before = servers[name].cpu_s()
            row = wrk(urls[name], body, args.duration, args.connections)
            requests = row["rps"] * max(1, round(args.duration))
            row["cpu_us_per_request"] = (servers[name].cpu_s() - before) / requests * 1e6
            return row

        measured = interleave({name: (lambda name=name: run(name)) for name in servers},
                              args.rounds)
        rss = {name: server.rss_mb() for name, server in servers.items()}
        startup = {name: server.startup_s for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    bare = measured["bare"]
    for name, row in measured.items():
        row["vs_bare"] = paired_ratio(measured, name, "bare")
        row["vs_lowlevel"] = paired_ratio(measured, name, "lowlevel")
        row["p99_minus_bare_ms"] = row["p99_ms"] - bare["p99_ms"]
        row["cpu_vs_bare"] = row["cpu_us_per_request"] / bare["cpu_us_per_request"]
        if "peer" in measured:
            row["vs_peer"] = paired_ratio(measured, name, "peer")
        row["rss_mb"] = rss[name]
        row["startup_s"] = startup[name]
    return {"servers": measured, "peer_note": peer_note}


def measure_record(work: Path, simulator: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Sequential unique requests: direct, through a passthrough proxy (the cost of the hop
    alone), and through a recording proxy (hop plus keying, locking and storing)."""
    ports = {"naive": free_port(), "passthrough": free_port(), "record": free_port()}
    proxies = [Server(mode, proxy_command(port, "--mode", mode, "--cassettes",
                                          str(work / "record-cassettes"), "--openai-upstream",
                                          simulator.url), port)
               for mode, port in ports.items() if mode != "naive"]
    proxies.append(Server("naive", [PY, "-c", NAIVE_FORWARDER, str(ports["naive"]),
                                    simulator.url], ports["naive"]))
    count = 100 if args.quick else 300
    times: dict[str, list[float]] = {"direct": [], "naive": [], "passthrough": [], "record": []}
    targets = {"direct": simulator.port, **ports}
    with running(*proxies):
        connections: dict[str, Any] = dict.fromkeys(times)
        for seed in range(1000, 1000 + count):  # unique seeds: every recording call is a miss
            for offset, (name, port) in enumerate(targets.items()):
                body = chat_body(seed + offset * 10_000, 16)
                started = time.perf_counter()
                status, _, connections[name] = http_post(port, "/v1/chat/completions", body,
                                                         connections[name])
                times[name].append((time.perf_counter() - started) * 1000)
                assert status == 200
    result: dict[str, Any] = {"requests": count}
    for name, values in times.items():
        result[f"{name}_p50_ms"] = statistics.median(values)
        result[f"{name}_p99_ms"] = percentile(values, 0.99)
    result["overhead_p50_ms"] = result["record_p50_ms"] - result["direct_p50_ms"]
    result["hop_p50_ms"] = result["passthrough_p50_ms"] - result["direct_p50_ms"]
    result["naive_hop_p50_ms"] = result["naive_p50_ms"] - result["direct_p50_ms"]
    return result


def measure_streaming(work: Path, simulator: Server, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proxy = Server("stream", proxy_command(port, "--mode", "replay", "--cassettes",
                                           str(work / "cassettes")), port)
    body = chat_body(42, 197, stream=True)
    samples: dict[str, list[tuple[float, float]]] = {"direct": [], "replay": []}
    with running(proxy):
        for _ in range(10 if args.quick else 40):
            samples["direct"].append(stream_times(simulator.port, "/v1/chat/completions", body))
            samples["replay"].append(stream_times(port, "/c/bench/v1/chat/completions", body))
    result: dict[str, Any] = {}
    for name, pairs in samples.items():
        result[f"{name}_first_ms"] = statistics.median(p[0] for p in pairs)
        result[f"{name}_last_ms"] = statistics.median(p[1] for p in pairs)
    result["first_event_added_ms"] = result["replay_first_ms"] - result["direct_first_ms"]
    return result


def measure_scale(work: Path, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    from replay_proxy.core.cassette import decode_entry

    template_file = next((work / "cassettes" / "bench").glob("chat.completions-*.json"))
    entries = [decode_entry(p.read_bytes(), str(p))
               for p in (work / "cassettes" / "bench").glob("chat.completions-*.json")]
    template = next(e for e in entries if e.recordings[0].events is None).recordings[0]
    del template_file
    root = work / "scale"
    started = time.monotonic()
    build_scale_cassettes(root, template, {"small": 100, "large": args.scale})
    built_s = time.monotonic() - started
    port = free_port()
    proxy = Server("scale", proxy_command(port, "--mode", "replay", "--cassettes", str(root)),
                   port)
    cold_count = 100  # the small cassette holds 100 keys
    with running(proxy):
        hot = {name: f"{proxy.url}/c/{name}/v1/chat/completions" for name in ("small", "large")}
        probe = chat_body(7, 8)
        for url in hot.values():
            wrk(url, probe, 0.5, args.connections)
        hot_rows = interleave({name: (lambda url=url: wrk(url, probe, args.duration,
                                                          args.connections))
                               for name, url in hot.items()}, args.rounds)
        # Cold hits: each key requested for the first time, so the store itself is read.
        cold = {name: statistics.median(sequential_ms(
            port, f"/c/{name}/v1/chat/completions",
            [chat_body(seed, 8) for seed in range(offset, offset + cold_count)]))
            for name, offset in (("small", 0), ("large", 50_000 if args.scale > 50_000 else 0))}
        rss = proxy.rss_mb()
        startup = proxy.startup_s
    by_store = cold_hits_by_store(root, args, cold_count)
    return {"recordings": args.scale, "build_s": built_s, "startup_s": startup, "rss_mb": rss,
            "hot": hot_rows, "cold_p50_ms": cold, "cold_by_store_p50_ms": by_store,
            "hot_large_vs_small": paired_ratio(hot_rows, "large", "small"),
            "cold_large_vs_small": cold["large"] / cold["small"]}


def measure_sse(chunk: int = 16 * 1024) -> dict[str, float]:
    """Seconds to split one event of 4 MiB and one of 31 MiB fed in 16 KiB chunks: what a
    stream with one huge event (a big tool-call argument, say) costs the recorder's loop."""
    from replay_proxy.core.sse import EventSplitter

    timings: dict[str, float] = {}
    for mib in (4, 31):
        stream = b"data: " + b"x" * (mib * 1024 * 1024) + b"\n\n"
        splitter = EventSplitter()
        started = time.perf_counter()
        events = [event for start in range(0, len(stream), chunk)
                  for event in splitter.feed(stream[start:start + chunk])]
        timings[f"{mib}MiB_s"] = time.perf_counter() - started
        assert events == [stream], "the splitter must give back the one event whole"
    return timings


def markdown_sse(sse: dict[str, float]) -> list[str]:
    return ["## Stream splitter (one event, fed in 16 KiB chunks)", "",
            f"4 MiB event: {sse['4MiB_s']:.3f} s; 31 MiB event: {sse['31MiB_s']:.3f} s.", ""]


def measure_misses(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Replay misses on a large cassette: the first (which may list the cassette), then one
    at a time and eight at once, each naming its nearest recording; meanwhile a client asks
    /_replay/health every 10 ms and the longest wait is kept."""
    template = Recording(status=200, headers={"content-type": "application/json"},
                         body=orjson.dumps({"id": "chatcmpl-bench", "object": "chat.completion",
                                            "choices": []}))
    root = work / "misses"
    started = time.monotonic()
    build_scale_cassettes(root, template, {"many": args.miss_keys})
    built_s = time.monotonic() - started
    port = free_port()
    proxy = Server("misses", proxy_command(port, "--mode", "replay", "--cassettes", str(root)),
                   port)
    path = "/c/many/v1/chat/completions"
    # Seed i with max_tokens 9 instead of 8: one field from recording i, so each miss names it.
    probe = [chat_body(seed, 9) for seed in range(100, 160)]
    waits: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            begun = time.perf_counter()
            connection.request("GET", "/_replay/health")
            connection.getresponse().read()
            waits.append((time.perf_counter() - begun) * 1000)
            time.sleep(0.01)
        connection.close()

    def miss(body: bytes) -> float:
        begun = time.perf_counter()
        status, answer, _ = http_post(port, path, body)
        assert status == 404 and b"differs in 1 field(s): max_tokens" in answer, answer[:300]
        return (time.perf_counter() - begun) * 1000

    with running(proxy):
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        try:
            first_ms = miss(probe[0])
            time.sleep(0.2)
            first_waits = list(waits)
            sequential = [miss(body) for body in probe[1:31]]
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8) as pool:
                begun = time.perf_counter()
                concurrent = list(pool.map(miss, probe[31:]))
                burst_s = time.perf_counter() - begun
        finally:
            stop.set()
            watcher.join()
        rss = proxy.rss_mb()
    return {"keys": args.miss_keys, "build_s": built_s, "first_miss_ms": first_ms,
            "miss_p50_ms": statistics.median(sequential),
            "miss_p99_ms": percentile(sequential, 0.99),
            "concurrent_p50_ms": statistics.median(concurrent), "burst_s": burst_s,
            "health_max_wait_ms": max(waits), "health_max_wait_first_ms": max(first_waits),
            "health_p99_wait_ms": percentile(waits, 0.99), "rss_mb": rss}


def markdown_misses(misses: dict[str, Any]) -> list[str]:
    return [f"## Replay misses on a cassette of {misses['keys']:,} keys", "",
            f"First miss (lists the cassette): {misses['first_miss_ms']:.0f} ms. Then, one at "
            f"a time: p50 {misses['miss_p50_ms']:.1f} ms, p99 {misses['miss_p99_ms']:.1f} ms; "
            f"eight at once: p50 {misses['concurrent_p50_ms']:.1f} ms. Each names its nearest "
            "recording. /_replay/health, asked every 10 ms meanwhile, waited at most "
            f"{misses['health_max_wait_ms']:.1f} ms (p99 {misses['health_p99_wait_ms']:.1f} ms; "
            f"{misses['health_max_wait_first_ms']:.1f} ms during the first miss). RSS "
            f"{misses['rss_mb']:.0f} MB.", ""]


def cold_hits_by_store(root: Path, args: argparse.Namespace, count: int) -> dict[str, float]:
    """First-time hits on 100 keys, one fresh proxy per store: what reading the store costs."""
    stores = {"directory": str(root), "diskcache": f"diskcache:{root.parent / 'cold-cache'}",
              "redis": args.redis_url + "?prefix=cold"}
    for name in ("diskcache", "redis"):
        subprocess.run([PY, "-m", "replay_proxy", "export", "--from", str(root), "--to", stores[name],
                        "--cassette", "small"], check=True, capture_output=True)
    samples: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(max(1, args.rounds)):
        for name, spec in stores.items():
            port = free_port()
            proxy = Server(name, proxy_command(port, "--mode", "replay", "--cassettes", str(root),
                                               "--store", spec), port)
            with running(proxy):
                samples[name] += sequential_ms(port, "/c/small/v1/chat/completions",
                                               [chat_body(seed, 8) for seed in range(count)])
    return {name: statistics.median(values) for name, values in samples.items()}


def profile_replay(work: Path, body: bytes, path: str, args: argparse.Namespace) -> list[str]:
    py_spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    port = free_port()
    proxy = Server("profile", proxy_command(port, "--mode", "replay", "--cassettes",
                                            str(work / "cassettes")), port)
    raw = work / "profile.txt"
    with running(proxy):
        assert proxy.process is not None
        wrk(proxy.url + path, body, 0.5, args.connections)
        load = threading.Thread(target=wrk, args=(proxy.url + path, body, 6.0, args.connections))
        load.start()
        time.sleep(0.5)
        subprocess.run([py_spy, "record", "-p", str(proxy.process.pid), "-d", "4", "-r", "400",
                        "-f", "raw", "-o", str(raw)], capture_output=True, check=False)
        load.join()
    return summarise_profile(raw)


def summarise_profile(raw: Path) -> list[str]:
    if not raw.exists():
        return ["py-spy produced no profile (is ptrace allowed here?)"]
    inclusive: dict[str, int] = {}
    total = 0
    runner = ("proxy/cli.py", "proxy/serving.py", "proxy/__main__.py")  # below every sample
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        names = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.split("(")[-1].split(":")[0]
            if ("proxy/" in where and not where.endswith(runner)) or name in (
                    "RequestHandler._handle_request", "StreamResponse.write_eof",
                    "BaseRequest.read", "RequestHandler.data_received"):
                names.add(name)
        for name in names:
            inclusive[name] = inclusive.get(name, 0) + int(count)
    rows = sorted(inclusive.items(), key=lambda item: -item[1])[:12]
    return [f"{count / total:6.1%}  {name}" for name, count in rows]


def markdown(results: dict[str, Any]) -> str:
    lines = ["# replay-proxy benchmarks", "",
             f"Command: `{results['command'].strip()}` on {results['machine']['cpus']} CPUs, "
             f"Python {results['machine']['python']}. Medians of {results['settings']['rounds']} "
             f"interleaved rounds of {results['settings']['duration_s']:g} s (order reversed "
             f"every other round), wrk -t1 -c{results['settings']['connections']}; ratios are "
             "medians of per-round ratios, each pair measured back to back. Response: "
             f"{results['fixture']['answer_bytes']} bytes of chat.completion.", "",
             ]
    if "throughput" in results:
        lines += markdown_throughput(results)
    if "record" in results:
        record = results["record"]
        lines += ["## Record mode", "",
                  f"{record['requests']} unique requests each, sequential, interleaved "
                  "(median / p99 ms):", "",
                  "| path | p50 ms | p99 ms |", "|---|---|---|",
                  f"| simulator direct | {record['direct_p50_ms']:.2f} | "
                  f"{record['direct_p99_ms']:.2f} |",
                  f"| a naive aiohttp forwarder (20 lines: no key, no store) | "
                  f"{record['naive_p50_ms']:.2f} | {record['naive_p99_ms']:.2f} |",
                  f"| replay-proxy --mode passthrough (the hop alone) | "
                  f"{record['passthrough_p50_ms']:.2f} | {record['passthrough_p99_ms']:.2f} |",
                  f"| replay-proxy --mode record (every request a new key) | "
                  f"{record['record_p50_ms']:.2f} | {record['record_p99_ms']:.2f} |", "",
                  f"Recording adds **{record['overhead_p50_ms']:+.2f} ms** median over direct, "
                  f"of which the proxy hop itself is {record['hop_p50_ms']:+.2f} ms; a naive "
                  f"aiohttp forwarder adds {record['naive_hop_p50_ms']:+.2f} ms on its own.", ""]
    if "streaming" in results:
        stream = results["streaming"]
        lines += [f"## Streaming replay ({results['fixture']['stream_events']} events)", "",
                  "| | first event ms | last event ms |", "|---|---|---|",
                  f"| simulator direct | {stream['direct_first_ms']:.2f} | "
                  f"{stream['direct_last_ms']:.2f} |",
                  f"| replay-proxy replay | {stream['replay_first_ms']:.2f} | "
                  f"{stream['replay_last_ms']:.2f} |", "",
                  f"Replay adds **{stream['first_event_added_ms']:+.2f} ms** to the first "
                  "event.", ""]
    if "scale" in results:
        lines += markdown_scale(results["scale"])
    if "sse" in results:
        lines += markdown_sse(results["sse"])
    if "fleet" in results:
        lines += markdown_fleet(results["fleet"])
    if "misses" in results:
        lines += markdown_misses(results["misses"])
    if "suite" in results:
        lines += bench_suite.markdown_suite(results["suite"])
    if results.get("profile"):
        lines += ["## Profile of a replay hit under load (py-spy, inclusive share)", ""]
        if results.get("profile_command"):  # profiled in a later run than the tables above
            lines += [f"From `{results['profile_command']}`.", ""]
        lines += ["```", *results["profile"], "```"]
    return "\n".join(lines) + "\n"


def markdown_throughput(results: dict[str, Any]) -> list[str]:
    lines = ["## Replay throughput", "",
             "| server | requests/s | p50 ms | p99 ms | vs bare | vs low-level bare | vs mitmproxy "
             "| p99 - bare p99 ms | CPU us/request | CPU vs bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"bare": "bare aiohttp, bytes from memory (the limit)",
              "lowlevel": "bare aiohttp low-level server on uvloop, bytes from memory",
              "directory": "replay-proxy, directory store", "diskcache":
              "replay-proxy, diskcache store", "redis": "replay-proxy, Redis store",
              "workers2": "replay-proxy, --workers 2 (directory)",
              "peer": "mitmproxy server replay"}
    for name, row in results["throughput"]["servers"].items():
        lines.append(f"| {labels.get(name, name)} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['vs_bare']:.2f}x | {row['vs_lowlevel']:.2f}x | "
                     f"{row.get('vs_peer', float('nan')):.1f}x | {row['p99_minus_bare_ms']:+.2f} | "
                     f"{row['cpu_us_per_request']:.0f} | {row['cpu_vs_bare']:.2f}x |")
    lines.append("\nThe limit is the issue's: a plain aiohttp application. replay-proxy runs on "
                 "aiohttp's low-level server and uvloop, so the low-level row is the same "
                 "machinery with nothing but the bytes to send: the stricter comparison. CPU per "
                 "request (user + system, all of a server's processes) is the steadiest measure "
                 "on a noisy machine: it does not depend on what else ran meanwhile.")
    if results["throughput"].get("peer_note"):
        lines.append(f"\n(peer: {results['throughput']['peer_note']})")
    rss = {name: row["rss_mb"] for name, row in results["throughput"]["servers"].items()}
    lines += ["", "RSS after the throughput runs (MB): " + ", ".join(
        f"{name} {value:.0f}" for name, value in rss.items()) + ".", ""]
    return lines


def markdown_scale(scale: dict[str, Any]) -> list[str]:
    return [f"## Scale ({scale['recordings']:,} recordings in one cassette vs 100)", "",
            "| cassette | hot hit requests/s | cold hit p50 ms |", "|---|---|---|",
            f"| 100 recordings | {scale['hot']['small']['rps']:,.0f} | "
            f"{scale['cold_p50_ms']['small']:.3f} |",
            f"| {scale['recordings']:,} recordings | {scale['hot']['large']['rps']:,.0f} | "
            f"{scale['cold_p50_ms']['large']:.3f} |", "",
            f"Hot hits (a request seen before) large/small: {scale['hot_large_vs_small']:.2f}x "
            f"throughput; cold hits (first request for a key, read from the store): "
            f"{scale['cold_large_vs_small']:.2f}x latency. Start-up with the large cassette: "
            f"{scale['startup_s']:.2f} s (no scan at start); RSS after the runs: "
            f"{scale['rss_mb']:.0f} MB.", "",
            "Cold hits by store (first request for each of 100 keys, a fresh proxy each, p50 ms): "
            + ", ".join(f"{name} {value:.3f}" for name, value in
                        scale["cold_by_store_p50_ms"].items()) + ".", ""]


# ---- fleet: proxies sharing Redis ------------------------------------------------------------

FLEET_SETUPS = {"redis": "one proxy, one Redis", "cluster": "two proxies, one 3-node cluster"}


def measure_fleet(work: Path, simulator: Server, body: bytes, path: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One proxy on one Redis against two proxies sharing one three-node Redis Cluster, every
    measure taken for both in the same round, the order reversed every other round."""
    from replay_proxy.core.cassette import decode_entry

    cold_count = 40 if args.quick else 100
    bursts = 100 if args.quick else 300
    template = next(entry for entry in (
        decode_entry(p.read_bytes(), str(p))
        for p in (work / "cassettes" / "bench").glob("chat.completions-*.json"))
        if entry.recordings[0].events is None).recordings[0]
    build_scale_cassettes(work / "fleet", template, {"fleet-cold": cold_count})
    with run_redis_cluster() as cluster:
        stores = {"redis": args.redis_url + "?prefix=fleet", "cluster": cluster.url}
        for spec in stores.values():
            for source in (work / "cassettes", work / "fleet"):
                subprocess.run([PY, "-m", "replay_proxy", "export", "--from", str(source),
                                "--to", spec], check=True, capture_output=True)

        def proxies(setup: str, *extra: str) -> list[Server]:
            count = 1 if setup == "redis" else 2
            ports = [free_port() for _ in range(count)]
            return [Server(f"{setup}-{port}", proxy_command(
                port, "--cassettes", str(work / "fleet-cassettes"), "--store", stores[setup],
                *extra), port) for port in ports]

        hot = {setup: proxies(setup, "--mode", "replay") for setup in stores}
        with running(*hot["redis"], *hot["cluster"]):
            for servers in hot.values():
                for server in servers:
                    wrk(server.url + path, body, 0.5, args.connections)

            def hits(setup: str) -> dict[str, float]:
                """wrk on every proxy of the setup at once, the connections shared out."""
                servers = hot[setup]
                share = max(1, args.connections // len(servers))
                rows: list[dict[str, float]] = []
                threads = [threading.Thread(target=lambda url=server.url: rows.append(
                    wrk(url + path, body, args.duration, share))) for server in servers]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                return {"rps": sum(row["rps"] for row in rows),
                        "p50_ms": max(row["p50_ms"] for row in rows),
                        "p99_ms": max(row["p99_ms"] for row in rows)}

            throughput = interleave({setup: (lambda setup=setup: hits(setup))
                                     for setup in stores}, args.rounds)

        def first_hits(setup: str) -> dict[str, float]:
            """Fresh proxies, each key asked for the first time: every answer read from the
            store, the keys dealt out over the proxies in turn."""
            servers = proxies(setup, "--mode", "replay")
            with running(*servers):
                times: list[float] = []
                bodies = [chat_body(seed, 8) for seed in range(cold_count)]
                for index, server in enumerate(servers):
                    times += sequential_ms(server.port, "/c/fleet-cold/v1/chat/completions",
                                           bodies[index::len(servers)])
            return {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 0.99)}

        cold = interleave({setup: (lambda setup=setup: first_hits(setup)) for setup in stores},
                          args.rounds)
        recorders = {setup: proxies(setup, "--mode", "record", "--openai-upstream",
                                    simulator.url) for setup in stores}
        seeds = iter(range(900_000, 1_000_000))

        def burst(setup: str) -> dict[str, float]:
            """`bursts` identical new requests at once, dealt out over the proxies."""
            servers = recorders[setup]
            before = sum(_upstream_calls(server) for server in servers)
            request = chat_body(next(seeds), 8)
            started = time.perf_counter()
            statuses = asyncio.run(_burst([server.url + "/c/fleet-burst/v1/chat/completions"
                                           for server in servers], request, bursts))
            elapsed = (time.perf_counter() - started) * 1000
            assert statuses == [200] * bursts, sorted(set(statuses))
            return {"upstream_calls": sum(_upstream_calls(server) for server in servers) - before,
                    "wall_ms": elapsed}

        _simulator_latency(simulator, 0.2)  # every request of a burst arrives during the call
        try:
            with running(*recorders["redis"], *recorders["cluster"]):
                single_flight = interleave({setup: (lambda setup=setup: burst(setup))
                                            for setup in stores}, args.rounds)
        finally:
            _simulator_latency(simulator, 0.0)
    return {"setups": FLEET_SETUPS, "hits": throughput, "first_hits": cold,
            "single_flight": single_flight, "cold_keys": cold_count, "burst": bursts,
            "cluster_vs_redis": paired_ratio(throughput, "cluster", "redis")}


async def _burst(urls: list[str], body: bytes, count: int) -> list[int]:
    import aiohttp

    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> int:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(urls[n % len(urls)]) for n in range(count))))


def _upstream_calls(server: Server) -> int:
    import urllib.request

    with urllib.request.urlopen(server.url + "/_replay/stats", timeout=10) as answer:
        return int(json.load(answer)["totals"].get("upstream_calls", 0))


def _simulator_latency(simulator: Server, seconds: float) -> None:
    import urllib.request

    request = urllib.request.Request(simulator.url + "/_sim/state", method="POST",
                                     data=json.dumps({"latency": seconds}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def markdown_fleet(fleet: dict[str, Any]) -> list[str]:
    lines = ["## Fleet: proxies sharing Redis", "",
             "| setup | hit requests/s | hit p99 ms | first hit p50 ms | first hit p99 ms | "
             f"upstream calls per burst of {fleet['burst']} identical misses | burst ms |",
             "|---|---|---|---|---|---|---|"]
    for setup, label in fleet["setups"].items():
        hits, cold = fleet["hits"][setup], fleet["first_hits"][setup]
        flight = fleet["single_flight"][setup]
        lines.append(f"| {label} | {hits['rps']:,.0f} | {hits['p99_ms']:.2f} | "
                     f"{cold['p50_ms']:.2f} | {cold['p99_ms']:.2f} | "
                     f"{flight['upstream_calls']:.0f} | {flight['wall_ms']:.0f} |")
    lines += ["", f"Hits, two proxies on the cluster / one proxy on Redis: "
              f"{fleet['cluster_vs_redis']:.2f}x (median of back-to-back pairs; the client's "
              "connections shared out over the proxies). First hits: "
              f"{fleet['cold_keys']} keys, each asked once of a fresh proxy, so each answer is "
              "read from the store. Bursts: identical new requests all at once, dealt out over "
              "the proxies, against an upstream that takes 200 ms.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
