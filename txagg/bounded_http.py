"""HTTP reads with hard bounds: a deadline for the whole request and a cap on the body.

httpx bounds each socket operation (``timeout``), not a request: a server that drips a byte
every few seconds, or streams forever, holds a client that relies on it for as long as it
likes. Here every read, write and connect of a request is given at most the time left until
the request's deadline, so the whole exchange (connect, headers, body) ends by then.

The body is read raw and decoded here, chunk by chunk, with the decompressors told how much
output they may produce: a gzip bomb stops at the cap instead of inflating into memory.
Only ``gzip`` and ``deflate`` are asked for and understood.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpcore
import httpx

from .errors import BodyError, BodyTooLarge

ACCEPT_ENCODING = "gzip, deflate"
CHUNK = 64 * 1024
MAX_ENCODINGS = 2  # Content-Encoding: gzip, gzip is legal; a longer chain is refused


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, transport: BoundedTransport):
        self.stream = stream
        self.transport = transport

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self.transport.time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self.transport.time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        timeout = self.transport.time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self.stream.start_tls(ssl_context, server_hostname, timeout), self.transport
        )

    def get_extra_info(self, info: str):
        return self.stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend, transport: BoundedTransport):
        self.backend = backend
        self.transport = transport

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = self.transport.time_left(timeout, httpcore.ConnectTimeout)
        stream = self.backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self.transport)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        timeout = self.transport.time_left(timeout, httpcore.ConnectTimeout)
        stream = self.backend.connect_unix_socket(path, timeout, socket_options)
        return _DeadlineStream(stream, self.transport)

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


class BoundedTransport(httpx.HTTPTransport):
    """httpx's transport whose requests end by a deadline set with ``deadline()``.

    One request at a time per transport (txagg's clients are used from one thread).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The pool's network backend is the one place every socket operation passes through.
        self._pool._network_backend = _DeadlineBackend(self._pool._network_backend, self)
        self._deadline: float | None = None

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        self._deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._deadline = None

    def time_left(self, timeout: float | None, error: type[Exception]) -> float | None:
        if self._deadline is None:
            return timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("the request's deadline passed")
        return left if timeout is None else min(timeout, left)


class _Decoder:
    """One Content-Encoding layer, never producing more than it is allowed."""

    def __init__(self, name: str):
        if name in ("gzip", "x-gzip"):
            self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name == "deflate":
            self.inflate = None  # zlib-wrapped or raw: decided by the first bytes
        else:
            raise BodyError(f"the upstream used an unsupported Content-Encoding: {name[:40]!r}")
        self.name = name

    def feed(self, data: bytes, allowed: int) -> bytes:
        if self.inflate is None:
            raw = len(data) < 2 or (data[0] & 0x0F) != 8 or (data[0] << 8 | data[1]) % 31 != 0
            self.inflate = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        out = bytearray()
        try:
            out += self.inflate.decompress(data, allowed + 1)
            while self.inflate.unconsumed_tail and len(out) <= allowed:
                out += self.inflate.decompress(self.inflate.unconsumed_tail, allowed + 1 - len(out))
        except zlib.error as error:
            raise BodyError(f"the upstream's {self.name} body is corrupt: {error}") from None
        return bytes(out)


def read_body(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """The decoded body of a streamed response, at most ``limit`` bytes.

    Past the limit: BodyTooLarge, or with ``truncate`` the first ``limit`` bytes.
    """
    if response.is_stream_consumed:  # an in-memory response (a caller's transport): read
        body = response.content
        if len(body) > limit and not truncate:
            raise BodyTooLarge(f"the upstream's answer is larger than {limit:,} bytes")
        return body[:limit]
    header = response.headers.get("content-encoding", "")
    names = [name.strip().lower() for name in header.split(",")]
    names = [name for name in names if name and name != "identity"]
    if len(names) > MAX_ENCODINGS:
        raise BodyError(f"the upstream stacked {len(names)} Content-Encodings")
    decoders = [_Decoder(name) for name in reversed(names)]
    body = bytearray()
    raw_size = 0
    for chunk in response.iter_raw(CHUNK):
        raw_size += len(chunk)
        data = chunk
        for decoder in decoders:
            data = decoder.feed(data, limit - len(body))
        body += data
        if len(body) > limit or raw_size > limit:
            if truncate:
                return bytes(body[:limit])
            raise BodyTooLarge(
                f"the upstream's answer is larger than {limit:,} bytes"
                + (" once decompressed" if decoders and raw_size <= limit else "")
            )
    return bytes(body)
