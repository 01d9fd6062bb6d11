"""A TCP proxy in front of a real server that can lose the network on cue.

``cut()`` aborts every connection through it at once (the client sees its
connection reset, whatever it had in flight may or may not have reached the
server); ``mute()`` keeps forwarding what clients send but swallows the
server's replies and aborts shortly after (the server did the work, the
client never hears: a commit whose acknowledgement is lost). New connections
go through as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.cuts = 0

    @classmethod
    def for_url(cls, url: str) -> Proxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """``url`` pointed at this proxy (same user, password, database)."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Reset every connection now."""
        self.cuts += 1
        for link in list(self._links):
            link.abort()

    def mute(self, for_seconds: float = 0.05) -> None:
        """Swallow the server's replies, then reset every connection ``for_seconds`` later."""
        self.cuts += 1
        links = list(self._links)
        for link in links:
            link.muted = True

        def abort() -> None:
            for link in links:
                link.abort()

        asyncio.get_running_loop().call_later(for_seconds, abort)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                link.pump(reader, up_writer, upstream=True),
                link.pump(up_reader, writer, upstream=False),
            )
        finally:
            self._links.discard(link)
            link.abort()


class _Link:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.muted = False

    def abort(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.muted and not upstream:
                    continue
                writer.write(data)
                await writer.drain()
        self.abort()
