"""Helpers for tests that users want too: run the proxy or the simulator in a background thread.

    with run_simulator() as sim, run_proxy(Settings(openai_upstream=sim.url, ...)) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test")
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from ..core.settings import Settings
from ..server.handler import ProxyRunner, ReplayProxy
from ..server.serving import new_event_loop
from ..server.state import ProxyState
from .simulator import SIM_STATE, SimulatorState, create_simulator

_T = TypeVar("_T")

# What a client connects to for a server bound to a wildcard address.
_REACHABLE = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class ServerThread:
    """A server (an aiohttp runner) on 127.0.0.1, from its own thread and event loop."""

    def __init__(self, make_runner: Callable[[], web.BaseRunner], port: int = 0,
                 host: str = "127.0.0.1", loop: str = "asyncio") -> None:
        self._make_runner = make_runner
        self._requested_port = port
        self.host = host
        self._loop = new_event_loop(loop)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.BaseRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the server (loopback for a wildcard host)."""
        host = _REACHABLE.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self.stop()  # a port in use: no thread or loop left behind
            raise
        return self

    async def _start(self) -> None:
        self._runner = self._make_runner()
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = int(server.sockets[0].getsockname()[1])

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        """Run a coroutine on the server's loop (e.g. to read its state safely)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)

    def invoke(self, function: Callable[[], _T], timeout: float = 30) -> _T:
        """Run a plain function on the server's loop thread, where its state is safe to change."""

        async def run() -> _T:
            return function()

        return self.call(run(), timeout)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class ProxyThread(ServerThread):
    def __init__(self, make_proxy: Callable[[], ReplayProxy], port: int = 0,
                 host: str = "127.0.0.1", loop: str = "asyncio") -> None:
        self.proxy: ReplayProxy | None = None

        def make_runner() -> web.BaseRunner:
            self.proxy = make_proxy()
            return ProxyRunner(self.proxy, shutdown_timeout=1.0)

        super().__init__(make_runner, port, host, loop)

    @property
    def state(self) -> ProxyState:
        assert self.proxy is not None
        return self.proxy.state


class SimulatorThread(ServerThread):
    def __init__(self, make_app: Callable[[], web.Application], port: int = 0) -> None:
        self.app: web.Application | None = None

        def make_runner() -> web.BaseRunner:
            self.app = make_app()
            return web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)

        super().__init__(make_runner, port)

    @property
    def state(self) -> SimulatorState:
        assert self.app is not None
        return self.app[SIM_STATE]


@contextmanager
def run_proxy(settings: Settings, environ: dict[str, str] | None = None,
              port: int = 0) -> Iterator[ProxyThread]:
    server = ProxyThread(lambda: ReplayProxy(settings, environ or {}), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def run_simulator(state: SimulatorState | None = None, port: int = 0) -> Iterator[SimulatorThread]:
    server = SimulatorThread(lambda: create_simulator(state), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def run_proxy_process(*args: str, env: dict[str, str] | None = None,
                      timeout: float = 30.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`replay-proxy serve ARGS` in a child process on a free port; yields (url, process)."""
    port = free_port()
    command = [sys.executable, "-m", "replay_proxy", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError("replay-proxy exited at start: "
                                   + (process.stderr.read() if process.stderr else b"").decode())
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replay-proxy did not listen on {port}") from None
                time.sleep(0.05)
        yield url, process
    except Exception as exc:
        # What the proxy logged is often the only account of why the test failed.
        _stop(process)
        if process.stderr is not None and not process.stderr.closed:
            log = process.stderr.read().decode(errors="replace")
            exc.add_note("replay-proxy's log:\n" + (log[-_LOG_TAIL:] or "(empty)"))
        raise
    finally:
        _stop(process)
        if process.stderr is not None:
            process.stderr.close()


_LOG_TAIL = 8000  # characters of the child's log attached to a failing test


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            # It stops once every answer is stored (well under a second, even under load).
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def run_redis(timeout: float = 20.0) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    import shutil
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/test installs Debian's "
                           "redis-server package)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="replay-redis-") as folder:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(64).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


# ---- Redis Cluster and TLS for the fleet tests ------------------------------------------------
# Kept apart from run_redis: a cluster needs a bus port per node and a join step, and a TLS
# server needs certificates, so each has its own helper.


def _wait_for_redis(port: int, process: subprocess.Popen[bytes], timeout: float,
                    ping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ping():
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Redis server on port {port} did not start")
        time.sleep(0.05)


def _plain_ping(port: int) -> Callable[[], bool]:
    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    return ping


class RedisClusterNodes:
    """A throwaway Redis Cluster on loopback: one primary per node, no replicas. Nodes can be
    stopped and started again (with their data, kept in an append-only file) to test
    failover."""

    def __init__(self, binary: str, cli: str, folder: str, count: int) -> None:
        self.binary, self.cli, self.folder = binary, cli, folder
        self.ports = [free_port() for _ in range(count)]
        self._bus_ports = {port: free_port() for port in self.ports}
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/"

    def start(self, port: int, timeout: float = 20.0) -> None:
        node_folder = os.path.join(self.folder, str(port))
        os.makedirs(node_folder, exist_ok=True)
        process = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
             "--dir", node_folder, "--save", "", "--appendonly", "yes",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self._bus_ports[port]),
             # Two seconds to declare a node failed, and the slots of the live nodes served
             # meanwhile: what the failover tests exercise.
             "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._processes[port] = process
        _wait_for_redis(port, process, timeout, _plain_ping(port))

    def stop(self, port: int) -> None:
        process = self._processes.pop(port, None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def command(self, port: int, *args: str) -> str:
        return subprocess.run([self.cli, "-p", str(port), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def slot_owner(self, slot: int) -> int:
        """The port of the node that serves a hash slot."""
        for port in self.ports:
            if port not in self._processes:
                continue
            for line in self.command(port, "cluster", "nodes").splitlines():
                fields = line.split()
                if len(fields) < 9 or "master" not in fields[2]:
                    continue
                node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                for span in fields[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return node_port
        raise LookupError(f"no live node knows who serves slot {slot}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every node says the cluster is ok and agrees on who serves each slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.command(port, "cluster", "info") for port in self.ports]
                views = {self._slot_view(port) for port in self.ports}
                if all("cluster_state:ok" in state for state in states) and len(views) == 1:
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis cluster did not become healthy")
            time.sleep(0.1)

    def _slot_view(self, port: int) -> str:
        rows = []
        for line in self.command(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) >= 9 and "fail" not in fields[2]:
                rows.append(fields[1].split("@")[0] + " " + " ".join(fields[8:]))
        return "\n".join(sorted(rows))

    def close(self) -> None:
        for port in list(self._processes):
            self.stop(port)


@contextmanager
def run_redis_cluster(nodes: int = 3, binary: str = "redis-server", cli: str = "redis-cli",
                      timeout: float = 60.0) -> Iterator[RedisClusterNodes]:
    """A throwaway Redis Cluster of `nodes` primaries on loopback (`redis-server
    --cluster-enabled yes`, joined with `redis-cli --cluster create`); yields its nodes, whose
    `url` is a `redis+cluster://` store URL."""
    import shutil
    import tempfile

    found, found_cli = shutil.which(binary), shutil.which(cli)
    if found is None or found_cli is None:
        raise RuntimeError(f"{binary} and {cli} are needed for a Redis Cluster (scripts/test "
                           "installs Debian's redis-server package, which has both)")
    with tempfile.TemporaryDirectory(prefix="replay-redis-cluster-") as folder:
        cluster = RedisClusterNodes(found, found_cli, folder, nodes)
        try:
            for port in cluster.ports:
                cluster.start(port)
            subprocess.run([found_cli, "--cluster", "create",
                            *(f"127.0.0.1:{port}" for port in cluster.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           capture_output=True, timeout=timeout, check=True)
            cluster.wait_healthy(timeout)
            yield cluster
        finally:
            cluster.close()


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway certificate authority, a server certificate for 127.0.0.1 and a client
    certificate, as PEM files."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(folder: str) -> TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def write_cert(cert: x509.Certificate, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("replay-proxy test CA"))
               .issuer_name(name("replay-proxy test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def issue(common: str, usage: x509.ObjectIdentifier
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    files = TlsFiles(*(os.path.join(folder, leaf) for leaf in (
        "ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")))
    server_cert, server_key = issue("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = issue("replay-proxy test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    write_cert(ca_cert, files.ca)
    write_cert(server_cert, files.server_cert)
    write_key(server_key, files.server_key)
    write_cert(client_cert, files.client_cert)
    write_key(client_key, files.client_key)
    return files


@contextmanager
def run_redis_tls(user: str, password: str, binary: str = "redis-server",
                  timeout: float = 20.0) -> Iterator[tuple[str, TlsFiles]]:
    """A throwaway redis-server that speaks only TLS, requires a client certificate and
    knows one user with a password; yields a `rediss://` store URL (credentials, CA file and
    client certificate in it) and the certificate files."""
    import shutil
    import ssl
    import tempfile
    from urllib.parse import quote, urlencode

    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary} is not installed (scripts/test installs Debian's "
                           "redis-server package, built with TLS)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="replay-redis-tls-") as folder:
        files = make_tls_files(folder)
        acl = os.path.join(folder, "users.acl")
        with open(acl, "w") as handle:  # the default user is off: every client must log in
            handle.write(f"user default off\nuser {user} on >{password} ~* &* +@all\n")
        process = subprocess.Popen(
            [found, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", files.server_cert, "--tls-key-file", files.server_key,
             "--tls-ca-cert-file", files.ca, "--tls-auth-clients", "yes",
             "--aclfile", acl, "--save", "", "--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        context = ssl.create_default_context(cafile=files.ca)
        context.load_cert_chain(files.client_cert, files.client_key)

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(f"AUTH {user} {password}\r\nPING\r\n".encode())
                answer = b""
                while answer.count(b"\r\n") < 2:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return answer == b"+OK\r\n+PONG\r\n"

        try:
            _wait_for_redis(port, process, timeout, ping)
            options = urlencode({"ssl_ca_certs": files.ca, "ssl_certfile": files.client_cert,
                                 "ssl_keyfile": files.client_key})
            yield (f"rediss://{quote(user, safe='')}:{quote(password, safe='')}"
                   f"@127.0.0.1:{port}/0?{options}"), files
        finally:
            process.terminate()
            process.wait(timeout=10)
