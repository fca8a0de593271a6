"""Worker processes for media work (probes and thumbnails), so decoders never run in the server.

A decoder fed a hostile file may loop, crash or allocate without end; in a thread none of that
can be stopped. Each worker is `python -m mediad.mediapool`, speaking one JSON line per job on
its stdin/stdout: a job that runs past the timeout gets its worker killed (and replaced on the next
job), a crash ends only that job, and an address-space limit bounds the memory one can take.
Workers start on first use and are reused; at most `size` run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

import anyio

log = logging.getLogger("mediad.mediapool")

MEMORY_LIMIT_BYTES = 2 * 1024**3  # address space per worker: FFmpeg and libvips reserve generously
_MAX_WAITING = 64  # jobs waiting for a worker beyond this are refused at once (503)
_NICENESS = 5  # the event loop and PostgreSQL come first when the cores are contended


class WorkerFailed(Exception):
    """The job did not produce a result; the message is a sentence for the user. `lasting`: the
    input is the cause (it fails, times out or crashes its decoder), so trying it again fails
    again; not so when the worker's own file I/O failed (a full disk)."""

    def __init__(self, reason: str, *, lasting: bool = True) -> None:
        super().__init__(reason)
        self.lasting = lasting


class Busy(Exception):
    """Every worker stayed busy for as long as the caller would wait."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mediad.mediapool", str(MEMORY_LIMIT_BYTES), str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"})  # glibc arenas count against the limit
        return cls(process)

    async def call(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(job).encode() + b"\n")
            await self.process.stdin.drain()
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            raise WorkerFailed(f"it took longer than the {timeout_s:g} s allowed and was stopped") from None
        except (ConnectionError, BrokenPipeError):
            line = b""
        if not line:
            raise WorkerFailed("the decoder crashed or ran out of memory on this file")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with anyio.CancelScope(shield=True):
            await self.process.wait()


class MediaPool:
    """At most `size` jobs at once, each in a worker process, each stopped after `timeout_s`."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._waiting = 0

    async def run(self, job: dict[str, Any], *, wait: float | None) -> Any:
        """The job's result. `wait`: seconds to wait for a free worker before Busy (None: no limit).
        Raises WorkerFailed with the reason when the job fails, times out or kills its worker."""
        await self._acquire(wait)
        try:
            worker = self._idle.pop() if self._idle else await _Worker.start()
            try:
                reply = await worker.call(job, self.timeout_s)
            except BaseException:  # timed out, crashed or cancelled: its state is unknown, end it
                await worker.kill()
                raise
            self._idle.append(worker)
        finally:
            self._slots.release()
        if "error" in reply:
            raise WorkerFailed(reply["error"], lasting=reply.get("lasting", True))
        return reply["result"]

    async def _acquire(self, wait: float | None) -> None:
        if wait is None:
            await self._slots.acquire()
            return
        if self._waiting >= _MAX_WAITING:
            raise Busy()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), wait)
        except TimeoutError:
            raise Busy() from None
        finally:
            self._waiting -= 1

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for worker in idle:
            await worker.kill()


# ---- the worker process ------------------------------------------------------------------------

def _dispatch(job: dict[str, Any]) -> Any:
    from . import media, thumbnails

    if job["op"] == "probe":
        return media.probe(job["path"], job["kind"], job["max_pixels"])
    if job["op"] == "thumbnail":
        thumbnails.render(job["path"], job["kind"], job["size"], job["format"], job["out"], job["max_pixels"])
        return None
    raise ValueError(f"unknown job {job['op']!r}")


def _answer(job: dict[str, Any]) -> dict[str, Any]:
    from .media import ProbeFailed

    try:
        return {"result": _dispatch(job)}
    except ProbeFailed as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": "decoding it needs more memory than a media worker may use"}
    except OSError:
        # The decoders' errors are caught as theirs (pyvips.Error, av.FFmpegError) before here:
        # this is our own I/O, writing a thumbnail (a full disk, its folder removed meanwhile).
        traceback.print_exc(file=sys.stderr)
        return {"error": "the server could not write the result to its disk", "lasting": False}
    except Exception:  # a library bug on odd input: the job fails, the worker lives on
        traceback.print_exc(file=sys.stderr)
        return {"error": "the decoder failed on this file"}


def _die_with_parent(parent: int) -> None:
    """SIGKILL this worker when the server that started it dies, even mid-job (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the server died before the line above ran
        os._exit(0)


def main() -> None:
    import resource

    _die_with_parent(int(sys.argv[2]))
    # A terminal's Ctrl-C goes to the whole process group: the server stops its workers itself, and
    # each would otherwise print a KeyboardInterrupt traceback on the way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # Replies go to a private copy of stdout; fd 1 becomes stderr, so no library that prints can
    # corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.nice(_NICENESS)
    import pyvips  # type: ignore[import-untyped]

    pyvips.cache_set_max(0)  # every job reads another file: libvips' operation cache only holds memory
    pyvips.concurrency_set(1)  # one core per worker; MEDIAD_MEDIA_WORKERS sets the parallelism
    for line in sys.stdin:
        replies.write(json.dumps(_answer(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
