"""A three-master Redis Cluster of the test's own, on free loopback ports in a temp dir."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from runtime.ops.embedded import EmbeddedRedis, EmbeddedServerError

#: Hash slots in a Redis Cluster, split evenly over the masters.
SLOTS = 16384


def server_binary(tmp: Path) -> Path | None:
    """A server binary that can run a cluster: the system's ``redis-server``, else the
    embedded Valkey the package ships; None if there is neither."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return Path(found)
    try:
        return EmbeddedRedis(tmp).binary
    except EmbeddedServerError:
        return None


def _free_ports(n: int) -> list[int]:
    """``n`` free ports whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _wait(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.05)


def _info(client: redis.Redis) -> dict[str, str]:
    raw = client.execute_command("CLUSTER INFO")
    if isinstance(raw, dict):  # redis-py parses it
        return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[list[int]]:
    """Start ``masters`` cluster-enabled servers, give each a third of the slots and
    introduce them (CLUSTER ADDSLOTSRANGE, CLUSTER MEET: no redis-cli needed); yields
    their ports once every node reports ``cluster_state:ok``; stops them afterwards.

    Raises RuntimeError (with the server's log) if a node cannot start."""
    binary = server_binary(directory)
    if binary is None:
        raise RuntimeError("no redis-server or valkey-server binary here")
    ports = _free_ports(masters)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = directory / f"node-{port}"
            node.mkdir(parents=True)
            conf = node / "redis.conf"
            conf.write_text(
                "\n".join(
                    [
                        "bind 127.0.0.1",
                        f"port {port}",
                        "cluster-enabled yes",
                        f"cluster-config-file {node / 'nodes.conf'}",
                        "cluster-node-timeout 5000",
                        f"dir {node}",
                        "save ''",
                        "appendonly no",
                        f"logfile {node / 'server.log'}",
                        "protected-mode no",
                    ]
                )
                + "\n"
            )
            procs.append(subprocess.Popen([str(binary), str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip
        clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]
        try:
            for port, client, proc in zip(ports, clients, procs, strict=True):
                try:
                    _wait(client.ping, 20, f"the node on port {port}")
                except RuntimeError:
                    log = directory / f"node-{port}" / "server.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"{binary} did not start a cluster node (exit {proc.poll()}): {tail}"
                    ) from None
            per = SLOTS // masters
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", i * per, last)
            for port in ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            for client in clients:
                _wait(
                    lambda c=client: _info(c).get("cluster_state") == "ok",
                    30,
                    "cluster_state:ok on every node",
                )
                _wait(
                    lambda c=client: len(c.execute_command("CLUSTER SLOTS")) == masters,
                    30,
                    "every node to know every master's slots",
                )
        finally:
            for client in clients:
                client.close()
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
