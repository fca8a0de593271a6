"""multipart/form-data: streaming-form-data, imported without smart_open, and `Envelope`, which
follows the framing the parser does not watch.

Its `targets` module imports smart_open at the top (≈15 MiB resident and ≈170 ms here) for
SmartPipeTarget, which mediad never uses. A placeholder stands in for the duration of the import
only, so anything else in the process that imports smart_open still gets the real one.
"""

from __future__ import annotations

import sys
import types

_placeholder = None
if "smart_open" not in sys.modules:
    _placeholder = sys.modules["smart_open"] = types.ModuleType("smart_open")
try:
    from streaming_form_data import StreamingFormDataParser
    from streaming_form_data.parser import ParseFailedException, parse_content_boundary
    from streaming_form_data.targets import BaseTarget, ValueTarget
    from streaming_form_data.validators import MaxSizeValidator, ValidationError
finally:
    if _placeholder is not None and sys.modules.get("smart_open") is _placeholder:
        del sys.modules["smart_open"]

__all__ = ["BaseTarget", "Envelope", "LimitExceeded", "MaxSizeValidator", "ParseFailedException",
           "StreamingFormDataParser", "ValidationError", "ValueTarget", "parse_content_boundary"]


class LimitExceeded(Exception):
    """The body's multipart framing is over one of Envelope's caps; the message says which."""


class Envelope:
    """Follows a multipart/form-data body's framing (RFC 2046 §5.1.1) as it streams past, for what
    streaming-form-data leaves undone:

    - it caps parts and part-header bytes: the parser buffers each header line whole, re-joining
      the buffer with every chunk, and parses header lines one by one on the event loop (about
      20 µs a line, 250 µs a part here), so 10,000 fields or a megabyte of headers would stall
      every other request for seconds;
    - it sees whether the close delimiter came: the parser takes a body cut off before it as whole;
    - it says where the close delimiter ends, so that the parser never sees the epilogue: fed bytes
      after `--boundary--` in the same chunk, the parser takes the close delimiter for part data;
    - it refuses the boundary inside a part (RFC 2046 §5.1.1: it must not occur there), which
      is framing the parser gets wrong: depending on where chunks end, `CRLF--boundary-x` in a
      part, or a part's content beginning with `--boundary`, ends that part early, as if closed;
    - it keeps each part's raw Content-Disposition: the parser unescapes backslashes in a quoted
      filename, where browsers send them raw (WHATWG), so `C:\\dir\\x.png` loses its separators.

    Feed it each chunk before the parser, so nothing over a cap is ever buffered there, and hand
    the parser only the bytes `feed` says are the body's.
    """

    def __init__(self, boundary: bytes, *, max_parts: int, max_header_bytes: int) -> None:
        self.parts = 0
        self.closed = False  # the close delimiter came
        self.dispositions: list[str] = []  # each part's Content-Disposition, as sent (latin-1)
        self._delimiter = b"\r\n--" + boundary
        self._max_parts = max_parts
        self._max_header_bytes = max_header_bytes
        self._header_bytes = 0  # of the finished header blocks
        self._fed = 0
        # Bytes that may begin a delimiter; the first one needs no CRLF before it.
        self._carry = b"\r\n"
        # Whether the carry begins with the CRLF that ends a part's headers: that CRLF is the
        # headers', so the boundary right after it is inside the part, not a delimiter.
        self._after_headers = False
        self._block: bytearray | None = None  # the headers of the part being read, while they are

    def feed(self, chunk: bytes) -> int:
        """Follow one chunk; → how many of its bytes are the body's: all of them, or those up to
        the end of the close delimiter (the epilogue after it is for no one, RFC 2046 §5.1.1)."""
        self._fed += len(chunk)
        rest = chunk
        while rest and not self.closed:
            rest = self._seek_delimiter(rest) if self._block is None else self._read_headers(rest)
        return len(chunk) - len(rest)

    def _seek_delimiter(self, chunk: bytes) -> bytes:
        """In a part's body (or before the first part): up to the next delimiter; → what follows it."""
        data = self._carry + chunk
        size = len(self._delimiter)
        at = data.find(self._delimiter)
        if at == 0 and self._after_headers:
            raise ParseFailedException("a part's content begins with the boundary")
        if at < 0 or at + size + 2 > len(data):  # none yet, or too close to the end to tell
            self._carry = data[at:] if at >= 0 else data[-(size - 1):]
            self._after_headers = self._after_headers and len(self._carry) == len(data)
            if self.parts == 0 and self._fed > self._max_header_bytes:
                raise LimitExceeded(f"the multipart body has no boundary in its first "
                                    f"{self._max_header_bytes} bytes")
            return b""
        follows = data[at + size:at + size + 2]
        if follows == b"--":
            self.closed, self._after_headers = True, False
            return data[at + size + 2:]
        if follows != b"\r\n":
            raise ParseFailedException("the boundary is followed by neither CRLF nor '--': it occurs "
                                       "inside a part")
        self.parts += 1
        if self.parts > self._max_parts:
            raise LimitExceeded(f"the multipart body has more than {self._max_parts} parts")
        self._carry = b""
        self._after_headers = False
        self._block = bytearray(b"\r\n")  # so that a part without headers ends at once
        return data[at + size + 2:]

    def _read_headers(self, chunk: bytes) -> bytes:
        """In a part's headers: up to the blank line that ends them; → what follows it."""
        block = self._block
        assert block is not None
        seen = len(block)
        block += chunk
        end = block.find(b"\r\n\r\n", max(seen - 3, 0))
        if self._header_bytes + (len(block) if end < 0 else end) > self._max_header_bytes:
            raise LimitExceeded(f"the multipart part headers are longer than {self._max_header_bytes} bytes "
                                "in all")
        if end < 0:
            return b""
        if block.find(self._delimiter, 0, end) >= 0:  # the boundary cannot reach past `end` (no CR in it)
            raise ParseFailedException("the boundary occurs inside a part's headers")
        self._header_bytes += end
        for line in bytes(block[2:end]).split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"content-disposition":
                self.dispositions.append(value.strip().decode("latin-1"))
        self._block = None
        self._carry, self._after_headers = b"\r\n", True
        return bytes(block[end + 4:])
