"""The `Store` of cloud replication on any S3-compatible server (AWS S3, MinIO, R2, Ceph, moto).

Requests go through the app's shared httpx client and are signed by botocore's SigV4 signer:
boto3 is synchronous, and aiobotocore would bring aiohttp, a second connection pool and bodies
it likes to buffer. Addressing is path-style (`{endpoint}/{bucket}/{key}`), which every
S3-compatible server accepts.

Integrity: an object only becomes visible once its bytes hash to the sha256 we were given.
- The file is hashed as it is read, and the last chunk (or part) is withheld when the hash is
  wrong: the request is cut short of its Content-Length, or the multipart upload aborted, so no
  server, checking or not, stores it.
- The server is asked to check too: `x-amz-checksum-sha256` on a single PUT (S3 and MinIO
  verify it; moto 5 stores it unchecked), and on each part `Content-MD5`, `x-amz-checksum-sha256`
  and a signed payload hash, all three verified by S3.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import anyio
import httpx
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from .cloud import CloudError, ranged_body
from .config import Settings
from .writer import TruncatedFile, read_span

log = logging.getLogger("mediad.s3")

MiB = 1 << 20
_CHUNK = MiB
_MAX_PARTS = 10_000  # S3's limit on the parts of one upload
_EMPTY_SHA256 = hashlib.sha256().hexdigest()
_UNSIGNED = "UNSIGNED-PAYLOAD"  # a streamed body cannot be hashed before it is sent


class _Signer(S3SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """botocore's S3 SigV4, with the payload hash given by the caller: botocore would hash the
    body of the AWSRequest, and ours is streamed or already hashed off the event loop."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _xml_text(body: bytes, tag: str) -> str | None:
    """Text of the first element named `tag` (any namespace) in an S3 XML answer."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rpartition("}")[2] == tag:
            return element.text
    return None


def _read(fd: int, offset: int, length: int, *hashes: Any) -> bytes:
    """`length` bytes at `offset`, fed to each hash (in a worker thread: hashlib drops the GIL)."""
    try:
        chunks = list(read_span(fd, offset, length, hashes))
    except TruncatedFile:
        raise CloudError("the local file is shorter than its recorded size") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _complete_body(parts: list[tuple[int, str, str]]) -> bytes:
    items = "".join(f"<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag>"
                    f"<ChecksumSHA256>{checksum}</ChecksumSHA256></Part>" for number, etag, checksum in parts)
    return f"<CompleteMultipartUpload>{items}</CompleteMultipartUpload>".encode()


class S3Store:
    """Client of one bucket of an S3-compatible server."""

    multipart_threshold = 64 * MiB  # larger files go up in parts (and are retried by part)
    part_size = 16 * MiB  # each part is held in memory once; S3's minimum is 5 MiB

    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        if not (settings.s3_endpoint_url and settings.s3_bucket):
            raise ValueError("MEDIAD_S3_ENDPOINT_URL and MEDIAD_S3_BUCKET are required for S3")
        if not (settings.s3_access_key and settings.s3_secret_key):
            raise ValueError("MEDIAD_S3_ACCESS_KEY and MEDIAD_S3_SECRET_KEY are required for S3")
        self.http = http
        self.bucket = settings.s3_bucket
        self.region = settings.s3_region
        self.bucket_url = f"{settings.s3_endpoint_url.rstrip('/')}/{quote(self.bucket, safe='')}"
        self._signer = _Signer(Credentials(settings.s3_access_key, settings.s3_secret_key), "s3",
                               settings.s3_region)

    def _url(self, key: str, query: dict[str, str] | None = None) -> str:
        # Encoded once here, exactly as SigV4 canonicalises it, so what is signed is what is sent.
        url = f"{self.bucket_url}/{quote(key, safe='/~')}" if key else self.bucket_url
        if query:
            url += "?" + "&".join(f"{name}={quote(value, safe='~')}" if value else name
                                  for name, value in sorted(query.items()))
        return url

    def _signed(self, method: str, url: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        request = AWSRequest(method=method, url=url, headers=headers)
        request.context["payload_sha256"] = payload_sha256
        self._signer.add_auth(request)
        return dict(request.headers.items())

    async def _call(self, method: str, key: str = "", *, query: dict[str, str] | None = None,
                    headers: dict[str, str] | None = None, content: bytes | AsyncIterable[bytes] = b"",
                    payload: str | None = None, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        """One signed request; CloudError on a transport error or a status not in `ok`."""
        url = self._url(key, query)
        if payload is None:
            assert isinstance(content, bytes), "a streamed body needs its payload hash"
            payload = hashlib.sha256(content).hexdigest()
        what = f"{method} {key or self.bucket}"
        signed = self._signed(method, url, headers or {}, payload)
        try:
            response = await self.http.request(method, url, content=content, headers=signed)
        except httpx.HTTPError as exc:
            raise CloudError(f"{what}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code not in ok:
            raise _failure(what, response)
        return response

    async def put(self, key: str, path: Path, size: int, sha256: str) -> str:
        """Stream the file up; returns its sha256, computed while it was read and sent, and
        equal to `sha256` (else CloudError, and nothing is stored)."""
        try:
            expected = bytes.fromhex(sha256)
        except ValueError:
            expected = b""
        if len(expected) != 32:
            raise CloudError(f"PUT {key}: {sha256!r} is not a sha256")
        fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if size > self.multipart_threshold:
                return await self._put_parts(key, fd, size, expected)
            return await self._put_single(key, fd, size, expected)
        finally:
            os.close(fd)

    async def _put_single(self, key: str, fd: int, size: int, expected: bytes) -> str:
        whole = hashlib.sha256()
        if size == 0 and whole.digest() != expected:
            raise _mismatch(key, whole, expected)

        async def body() -> AsyncIterator[bytes]:
            offset = 0
            while offset < size:
                chunk = await anyio.to_thread.run_sync(_read, fd, offset, min(_CHUNK, size - offset), whole)
                offset += len(chunk)
                if offset == size and whole.digest() != expected:
                    # Withheld last bytes: a body short of its Content-Length is never stored.
                    raise _mismatch(key, whole, expected)
                yield chunk

        checksum = _b64(expected)
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream",
                   "x-amz-checksum-sha256": checksum}
        response = await self._call("PUT", key, headers=headers, content=body(), payload=_UNSIGNED)
        echoed = response.headers.get("x-amz-checksum-sha256")
        if echoed is not None and echoed != checksum:
            raise CloudError(f"PUT {key}: S3 reports sha256 {echoed}, ours is {checksum}")
        return whole.hexdigest()

    async def _put_parts(self, key: str, fd: int, size: int, expected: bytes) -> str:
        created = await self._call("POST", key, query={"uploads": ""}, headers={
            "Content-Type": "application/octet-stream", "x-amz-checksum-algorithm": "SHA256"})
        upload_id = _xml_text(created.content, "UploadId")
        if not upload_id:
            raise CloudError(f"POST {key}?uploads: S3's answer has no UploadId")
        try:
            whole = hashlib.sha256()
            part_size = max(self.part_size, -(-size // _MAX_PARTS))
            parts: list[tuple[int, str, str]] = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                length = min(part_size, size - offset)
                digest, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
                data = await anyio.to_thread.run_sync(_read, fd, offset, length, whole, digest, md5)
                if offset + length == size and whole.digest() != expected:
                    raise _mismatch(key, whole, expected)  # before the last part: never completed
                checksum = _b64(digest.digest())
                response = await self._call(
                    "PUT", key, query={"partNumber": str(number), "uploadId": upload_id}, content=data,
                    payload=digest.hexdigest(), headers={
                        "Content-Length": str(length), "Content-MD5": _b64(md5.digest()),
                        "x-amz-checksum-sha256": checksum})
                parts.append((number, response.headers.get("etag", ""), checksum))
                del data  # one part in memory at a time, not two while the next is read
            complete = _complete_body(parts)
            response = await self._call("POST", key, query={"uploadId": upload_id}, content=complete,
                                        headers={"Content-Type": "application/xml"})
            # CompleteMultipartUpload can fail after its 200 has been sent: the error is the body.
            if _xml_text(response.content, "Code"):
                raise _failure(f"POST {key}?uploadId", response)
            return whole.hexdigest()
        except BaseException:
            # Never leave a half upload behind: it is invisible but billed until aborted.
            with anyio.move_on_after(10, shield=True):
                try:
                    await self._call("DELETE", key, query={"uploadId": upload_id}, ok=(200, 204, 404))
                except CloudError as exc:
                    log.warning("could not abort the multipart upload of %s: %s", key, exc)
            raise

    async def delete(self, key: str) -> None:
        await self._call("DELETE", key, ok=(200, 204, 404))

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of an object, streamed; raises CloudError rather than end short."""
        if start >= end:
            return
        url = self._url(key)
        headers = self._signed("GET", url, {"Range": f"bytes={start}-{end - 1}"}, _EMPTY_SHA256)
        try:
            async with self.http.stream("GET", url, headers=headers) as response:
                if response.status_code not in (200, 206):
                    await response.aread()
                    raise _failure(f"GET {key}", response)
                async for chunk in ranged_body(response, key, start, end):
                    yield chunk
        except httpx.HTTPError as exc:
            raise CloudError(f"GET {key}: {exc.__class__.__name__}: {exc}") from exc

    async def ping(self) -> float:
        """Seconds for a HeadBucket, which also proves the credentials and the bucket."""
        started = time.perf_counter()
        with anyio.move_on_after(5):
            await self._call("HEAD")
            return time.perf_counter() - started
        raise CloudError(f"HEAD {self.bucket}: no answer within 5 s")

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (for tests and first runs; needs the right to)."""
        response = await self._call("HEAD", ok=(200, 404))
        if response.status_code == 200:
            return
        body = b""
        if self.region != "us-east-1":  # S3 rejects a LocationConstraint naming its default region
            body = (f'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>").encode()
        created = await self._call("PUT", content=body, ok=(200, 409))
        if created.status_code == 409 and _xml_text(created.content, "Code") != "BucketAlreadyOwnedByYou":
            raise _failure(f"PUT {self.bucket}", created)


def _mismatch(key: str, whole: Any, expected: bytes) -> CloudError:
    return CloudError(f"PUT {key}: the local file's sha256 is {whole.hexdigest()[:16]}…, "
                      f"not {expected.hex()[:16]}…")


def _failure(what: str, response: httpx.Response) -> CloudError:
    code = _xml_text(response.content, "Code") if response.content else None
    return CloudError(f"{what}: S3 answered {response.status_code}{f' {code}' if code else ''}")
