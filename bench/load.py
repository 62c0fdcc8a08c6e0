"""A small closed-loop load generator: N clients, each one keep-alive connection, one request at a time.

Written on raw asyncio streams rather than an HTTP library so that the generator, which shares the
two cores with the server it measures, spends as little CPU per request as possible. Every request
is recorded as (start, latency, status); statistics are taken over a fixed window after a warm-up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from bench.report import median, percentile

#: A request that takes longer than this counts as an error (status 0) and its connection is replaced.
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Sample:
    start: float
    latency: float
    status: int  # 0: connection error or timeout


@dataclass
class LoadResult:
    """Throughput and latency of one load level over its measured window."""

    concurrency: int
    window_s: float
    ok: int
    non_200: int
    errors: int
    statuses: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0  # over the whole window
    # Throughput per third of the window: its spread shows bursts of other work on the machine. Not the
    # headline: at 32 clients answers come back a batch at a time, so a short segment counts in steps of ~16.
    segment_rps: list[float] = field(default_factory=list)
    rps_segment_median: Optional[float] = None
    client_cpu: Optional[float] = None  # CPU seconds per second the load generator itself used
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    mean_ms: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    @property
    def bad(self) -> int:
        return self.non_200 + self.errors


def stats(samples: Sequence[Sample], concurrency: int, window_s: float,
          window: Optional[tuple[float, float]] = None, segments: int = 3) -> LoadResult:
    """Statistics of `samples`; with the measured `window` (start, end), throughput is also taken per segment."""
    ok = [s for s in samples if s.status == 200]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    lat = [s.latency * 1000 for s in ok]
    overall = len(ok) / window_s if window_s > 0 else 0.0
    segment_rps: list[float] = []
    if window is not None and segments > 1:
        a, b = window
        step = (b - a) / segments
        ends = [s.start + s.latency for s in ok]
        segment_rps = [sum(1 for e in ends if a + i * step <= e < a + (i + 1) * step) / step for i in range(segments)]
    return LoadResult(
        concurrency=concurrency,
        window_s=window_s,
        ok=len(ok),
        non_200=sum(1 for s in samples if s.status not in (200, 0)),
        errors=sum(1 for s in samples if s.status == 0),
        statuses=statuses,
        rps=overall,
        segment_rps=[round(x, 2) for x in segment_rps],
        rps_segment_median=median(segment_rps) if segment_rps else None,
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        mean_ms=(sum(lat) / len(lat)) if lat else None,
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, connection closes) of one HTTP/1.1 response; the body is read and dropped."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split(b" ", 2)[1])
    length: Optional[int] = None
    chunked = close = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        close = True
    return status, close


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _client(index: int, host: str, port: int, requests: Sequence[bytes], stop: "asyncio.Event | threading.Event",
                  deadline: Optional[float], out: list[Sample]) -> None:
    reader = writer = None
    i = index * 7  # clients start at different places in the text mix
    try:
        while not stop.is_set() and (deadline is None or time.perf_counter() < deadline):
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    out.append(Sample(time.perf_counter(), 0.0, 0))
                    await asyncio.sleep(0.05)
                    continue
            payload = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            try:
                writer.write(payload)
                status, close = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
            except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                out.append(Sample(start, time.perf_counter() - start, 0))
                writer.close()
                reader = writer = None
                continue
            out.append(Sample(start, time.perf_counter() - start, status))
            if close:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def _run(url: str, path: str, bodies: Sequence[bytes], concurrency: int, duration: Optional[float],
               stop: threading.Event) -> list[Sample]:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = [_request(host, port, path, b) for b in bodies]
    out: list[Sample] = []
    deadline = None if duration is None else time.perf_counter() + duration
    await asyncio.gather(*(_client(i, host, port, requests, stop, deadline, out) for i in range(concurrency)))
    return out


def run_load(url: str, path: str, bodies: Sequence[bytes], concurrency: int, duration: float, warmup: float = 2.0) -> LoadResult:
    """Closed-loop load for `warmup + duration` seconds; statistics over requests that finish in the last `duration`."""
    begin = time.perf_counter()
    cpu_before = time.process_time()
    samples = asyncio.run(_run(url, path, bodies, concurrency, warmup + duration, threading.Event()))
    cpu = (time.process_time() - cpu_before) / (time.perf_counter() - begin)
    window_start, window_end = begin + warmup, begin + warmup + duration
    measured = [s for s in samples if window_start <= s.start + s.latency <= window_end]
    # Batches finish in bursts: segments shorter than a few seconds would only count the bursts.
    result = stats(measured, concurrency, duration, window=(window_start, window_end), segments=3 if duration >= 9 else 1)
    result.client_cpu = round(cpu, 3)
    return result


class BackgroundLoad:
    """Load in a thread of its own until stopped; the samples are kept for windowed statistics."""

    def __init__(self, url: str, path: str, bodies: Sequence[bytes], concurrency: int):
        self.url, self.path, self.bodies, self.concurrency = url, path, bodies, concurrency
        self._stop = threading.Event()
        self.samples: list[Sample] = []
        self._thread = threading.Thread(target=self._main, name="bench-load", daemon=True)
        self.started_at = 0.0
        self.stopped_at = 0.0

    def _main(self) -> None:
        self.samples = asyncio.run(_run(self.url, self.path, self.bodies, self.concurrency, None, self._stop))

    def __enter__(self) -> "BackgroundLoad":
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S + 10)
        self.stopped_at = time.perf_counter()

    def overlapping(self, windows: Sequence[tuple[float, float]]) -> list[Sample]:
        """Samples whose request was in flight at any moment of any of the (start, end) windows."""
        return [s for s in self.samples if any(s.start <= b and s.start + s.latency >= a for a, b in windows)]

    def outside(self, windows: Sequence[tuple[float, float]], after: float) -> list[Sample]:
        return [s for s in self.samples
                if s.start >= after and not any(s.start <= b and s.start + s.latency >= a for a, b in windows)]
