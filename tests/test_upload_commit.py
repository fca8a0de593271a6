"""An upload's transaction losing its database connection, before COMMIT or during it, through a
proxy between mediad and PostgreSQL that cuts the connection of the upload's transaction. Before
COMMIT the upload leaves nothing; once COMMIT is sent the outcome is unknown to mediad, and the
blob must stay: the row may exist (its File is intact), or not (an orphan for start-up recovery)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from conftest import assert_problem, make_settings, make_user, serve_in_thread, upload

from mediad.storage import blob_relpath

MARKER = "commit-cut-5d1f.bin"  # the upload's name: its INSERT is the first message that carries it
_SSL_REQUEST, _GSS_REQUEST = 80877103, 80877104


class Cutter:
    """A TCP proxy in front of PostgreSQL that cuts the first connection whose messages carry
    MARKER: at that message (`before-commit`), or at the COMMIT that follows it, which PostgreSQL
    then runs (`after-commit`) or never sees (`commit-unsent`); mediad hears no answer either way."""

    def __init__(self, database_url: str, mode: str) -> None:
        self.database_url, self.mode = database_url, mode
        self.cut = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """→ a database URL for mediad that goes through the proxy. The proxy has a thread and a
        loop of its own: the test's loop blocks while a server in a thread starts and stops."""
        started: queue.SimpleQueue[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = queue.SimpleQueue()

        async def main() -> None:
            stop = asyncio.Event()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            started.put((server.sockets[0].getsockname()[1], asyncio.get_running_loop(), stop))
            await stop.wait()
            server.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="pg-cutter", daemon=True)
        thread.start()
        port, loop, stop = started.get(timeout=10)
        parts = urlsplit(self.database_url)
        try:
            yield f"postgresql://{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}{parts.path}"
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.database_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        port = parts.port or 5432
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await self._upstream()
        try:
            # The untyped start: SSL or GSS encryption asked for (refused by the server here, or the
            # proxy could not read on), then the startup message.
            while True:
                head = await client.readexactly(8)
                to_server.write(head + await client.readexactly(int.from_bytes(head[:4], "big") - 8))
                if int.from_bytes(head[4:], "big") not in (_SSL_REQUEST, _GSS_REQUEST):
                    break
                answer = await server.readexactly(1)
                assert answer == b"N", "the proxy cannot read an encrypted connection"
                to_client.write(answer)
            dropping = asyncio.Event()
            # Whichever side ends first (a cut, or the server closing after a Terminate) ends both.
            tasks = {asyncio.create_task(self._watch(client, to_server, dropping)),
                     asyncio.create_task(self._relay(server, to_client, dropping))}
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            to_server.transport.abort()
            to_client.transport.abort()

    async def _watch(self, client: asyncio.StreamReader, to_server: asyncio.StreamWriter,
                     dropping: asyncio.Event) -> None:
        """Client to server, one message at a time, until this connection is the one to cut."""
        armed = False
        while True:
            head = await client.readexactly(5)
            message = head + await client.readexactly(int.from_bytes(head[1:], "big") - 4)
            if not self.cut.is_set() and MARKER.encode() in message:
                if self.mode == "before-commit":
                    self.cut.set()
                    return
                armed = True
            if armed and message[:1] == b"Q" and message[5:].upper().startswith(b"COMMIT"):
                dropping.set()  # PostgreSQL's answer never reaches mediad
                if self.mode == "after-commit":
                    to_server.write(message)
                    await self._committed()
                self.cut.set()
                return
            to_server.write(message)

    @staticmethod
    async def _relay(server: asyncio.StreamReader, to_client: asyncio.StreamWriter, dropping: asyncio.Event) -> None:
        while data := await server.read(65536):
            if not dropping.is_set():
                to_client.write(data)

    async def _committed(self) -> None:
        """Until PostgreSQL has committed the upload's row (seen from a connection of its own)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            for _ in range(1000):
                if await conn.fetchval("SELECT count(*) FROM files WHERE name = $1", MARKER):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("PostgreSQL never committed the upload")
        finally:
            await conn.close()


async def rows_named(database_url: str, name: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT id, blob_id, path FROM files WHERE name = $1", name)
    finally:
        await conn.close()


def leftovers(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "files").rglob("*") if p.is_file()) + sorted((data_dir / "tmp").glob("*"))


@pytest.mark.parametrize("mode", ["before-commit", "after-commit", "commit-unsent"])
async def test_a_connection_lost_in_the_upload_transaction_never_loses_a_committed_file(
        database_url: str, tmp_path: Path, mode: str) -> None:
    data_dir, data = tmp_path / "data", b"the bytes of the upload " * 1000
    cutter = Cutter(database_url, mode)
    with cutter.running() as proxied_url:
        with serve_in_thread(make_settings(data_dir), proxied_url) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                user = await make_user(http)
                # An earlier file: start-up recovery leaves every blob alone when the database names
                # none of this data dir's (more likely the wrong database than a crash's leftovers).
                kept = await upload(http, user, b"an earlier file", path="/kept.bin")
                before = leftovers(data_dir)
                response = await http.put("/files", headers=user.auth, params={"path": f"/in/{MARKER}"},
                                          content=data)
                assert cutter.cut.is_set()
                assert_problem(response, 503)  # the database did not answer: mediad cannot tell more
                rows = await rows_named(database_url, MARKER)
                if mode == "after-commit":
                    # PostgreSQL committed: the File is whole, on disk and served.
                    assert [r["path"] for r in rows] == [f"/in/{MARKER}"]
                    assert (data_dir / blob_relpath(rows[0]["blob_id"])).read_bytes() == data
                    served = await http.get("/download", headers=user.auth, params={"path": f"/in/{MARKER}"})
                    assert served.status_code == 200 and served.content == data
                    return
                assert rows == []
                orphans = sorted(set(leftovers(data_dir)) - set(before))
                if mode == "before-commit":
                    assert orphans == []  # rolled back for certain: nothing is left
                    return
                # COMMIT never ran, but mediad cannot know: the blob is left for the cleanup.
                assert len(orphans) == 1 and orphans[0].read_bytes() == data
    # The next start, alone on the data dir, removes the blob no row names; the other one stays.
    with serve_in_thread(make_settings(data_dir), database_url) as restarted:
        assert leftovers(data_dir) == before
        async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
            shown = await http.get(f"/files/{kept['id']}", headers=user.auth)
            assert shown.status_code == 200
