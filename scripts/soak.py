"""Soak test, run by `scripts/soak`: many mixed requests against one proxy process, watching
its memory, open file descriptors and sockets for leaks.

The mix: replay hits on keys recorded at the start, new keys (misses that are forwarded and
recorded), and streams (both kinds), from a fixed pool of concurrent clients, all on loopback
against the bundled simulator. It prints a sample every 5,000 requests and exits 1 if RSS or
descriptors keep growing. `--prompt-kb 1024 --cache-mb 32` makes every prompt 1 MiB, to show
that memory follows the cache budget, not the number or size of the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import orjson
from replay_proxy.tools.testing import free_port

ROOT = Path(__file__).resolve().parent.parent


def _start(args: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "replay_proxy", *args, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return process
        except httpx2.HTTPError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{args[0]} did not start") from None
            time.sleep(0.05)


def _sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    return {"rss_mb": rss, "fds": len(fds), "sockets": sockets}


PADDING = {"text": ""}  # --prompt-kb: filler appended to every prompt


def _body(seed: int, stream: bool) -> bytes:
    body: dict[str, object] = {"model": "gpt-4o-mini", "seed": seed, "max_tokens": 24,
                               "messages": [{"role": "user",
                                             "content": "Soak test." + PADDING["text"]}]}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def _run(url: str, total: int, clients: int, pid: int) -> list[dict[str, float]]:
    rng = random.Random(7)
    next_new = 1_000_000
    counts = {"hit": 0, "new": 0, "stream": 0, "errors": 0}
    samples: list[dict[str, float]] = []
    done = 0
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=clients * 4)

    async def client(http: httpx2.AsyncClient) -> None:
        nonlocal done
        while True:
            kind, body = await queue.get()
            try:
                async with http.stream("POST", url + "/v1/chat/completions", content=body,
                                       headers={"Content-Type": "application/json",
                                                "Authorization": "Bearer sk-soak"}) as response:
                    await response.aread()
                    if response.status_code != 200:
                        counts["errors"] += 1
            except httpx2.HTTPError:
                counts["errors"] += 1
            counts[kind] += 1
            done += 1
            if done % 5000 == 0:
                samples.append({"requests": done, **_sample(pid)})
                print(f"{done:>7} requests  " + "  ".join(
                    f"{k} {v:.0f}" for k, v in samples[-1].items() if k != "requests"),
                    flush=True)
            queue.task_done()

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as http:
        workers = [asyncio.create_task(client(http)) for _ in range(clients)]
        for _ in range(total):
            roll = rng.random()
            if roll < 0.6:
                item = ("hit", _body(rng.randrange(200), False))
            elif roll < 0.8:
                next_new += 1
                item = ("new", _body(next_new, False))
            else:
                seed = rng.randrange(200) if rng.random() < 0.5 else next_new + 1
                next_new += 1
                item = ("stream", _body(seed, True))
            await queue.put(item)
        await queue.join()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    print("mix: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts["errors"]:
        raise SystemExit(f"{counts['errors']} requests failed")
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-rss-growth-mb", type=float, default=60.0)
    parser.add_argument("--prompt-kb", type=int, default=0, help="filler in every prompt, KiB")
    parser.add_argument("--cache-mb", type=int, default=None, help="the proxy's --cache-mb")
    args = parser.parse_args()
    PADDING["text"] = " " + "x" * (args.prompt_kb * 1024) if args.prompt_kb else ""
    budget = ["--cache-mb", str(args.cache_mb)] if args.cache_mb is not None else []
    with tempfile.TemporaryDirectory(prefix=".soak-", dir=ROOT) as folder:
        sim_port, proxy_port = free_port(), free_port()
        simulator = _start(["simulate"], sim_port)
        proxy = _start(["serve", "--mode", "record", "--cassettes", folder, "--openai-upstream",
                        f"http://127.0.0.1:{sim_port}", *budget], proxy_port)
        try:
            url = f"http://127.0.0.1:{proxy_port}"
            warm = [httpx2.post(url + "/v1/chat/completions", content=_body(seed, stream),
                                headers={"Content-Type": "application/json",
                                         "Authorization": "Bearer sk-soak"})
                    for seed in range(200) for stream in (False, True)]
            assert all(r.status_code == 200 for r in warm)
            started = time.monotonic()
            before = _sample(proxy.pid)
            print(f"{'start':>7}           " + "  ".join(f"{k} {v:.0f}" for k, v in before.items()))
            samples = asyncio.run(_run(url, args.requests, args.clients, proxy.pid))
            elapsed = time.monotonic() - started
            memory = httpx2.get(url + "/_replay/stats").json().get("memory", {})
            print("caches: " + ", ".join(f"{k} {v}" for k, v in memory.items()))
        finally:
            proxy.terminate()
            simulator.terminate()
            proxy.wait(10)
            simulator.wait(10)
    after = samples[-1]
    settled = samples[len(samples) // 2]  # growth over the second half shows a leak
    print(f"{args.requests} requests in {elapsed:.0f} s ({args.requests / elapsed:.0f}/s); RSS "
          f"{before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MB (second half "
          f"{after['rss_mb'] - settled['rss_mb']:+.1f} MB); fds {before['fds']:.0f} -> "
          f"{after['fds']:.0f}; sockets {before['sockets']:.0f} -> {after['sockets']:.0f}")
    leaked = after["rss_mb"] - before["rss_mb"] > args.max_rss_growth_mb or \
        after["fds"] > before["fds"] + args.clients + 4
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
