"""A minimal keep-alive HTTP/1.1 client and an open-loop flood, for the overload tests.

~0.1 ms of CPU per request (httpx costs ~1 ms), because client and server share this machine's two
cores. `python -m tests.server.rawhttp` runs a flood in its own process, so the flood's event loop
cannot delay the latency-measuring client (its lag would be counted as server latency); `--nice`
lowers its CPU priority so that, on a machine it shares with the server, it takes the cores the
server leaves idle, as a flood from another machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


class RawClient:
    """Keep-alive HTTP/1.1 POSTs over asyncio streams; returns (status, headers, body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{head}content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        while True:
            reused = bool(self._idle)
            reader, writer = (
                self._idle.pop() if reused else await asyncio.open_connection("127.0.0.1", self.port)
            )
            try:
                writer.write(request)
                line = await reader.readline()
            except (ConnectionResetError, BrokenPipeError):
                if not reused:
                    writer.close()
                    raise
                line = b""
            if line or not reused:
                break
            # The server closed this idle connection (uvicorn's keep-alive timeout is 5 s) before it
            # read the request: nothing was processed, so the request goes out again on a fresh
            # connection, as every HTTP client does.
            writer.close()
        try:
            status = int(line.split(b" ", 2)[1])
            hdrs: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower().decode()] = v.strip().decode()
            data = await reader.readexactly(int(hdrs.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, hdrs, data

    def close(self) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()


@dataclass
class Flood:
    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    retry_after_missing: int = 0
    started: float = 0.0
    stopped: float = 0.0

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


async def flood(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    rate: float,
    stop: asyncio.Event,
    max_in_flight: int | None = None,
) -> Flood:
    """Open-loop requests at `rate` until `stop`; each on a pooled connection (new ones as needed).

    `max_in_flight` caps the requests awaiting an answer (the sender waits for a free place, and then
    falls behind `rate`): what a server holds for a flood it cannot keep up with then stays the same
    on a fast and on a slow or busy machine, instead of growing with the backlog."""
    out, pool, tasks = Flood(started=time.monotonic()), [], []
    places = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def one() -> None:
        try:
            await request()
        finally:
            if places is not None:
                places.release()

    async def request() -> None:
        client = pool.pop() if pool else RawClient(port)
        try:
            status, hdrs, data = await asyncio.wait_for(client.post(path, body, headers), 60)
        except (OSError, asyncio.IncompleteReadError, IndexError, asyncio.TimeoutError) as e:
            client.close()
            out.count(f"connection: {type(e).__name__}")  # the server closed a connection it did not read
            return
        pool.append(client)
        if status == 429:
            reason = "rate" if "requests/s" in data.decode(errors="replace") else "queue"
            out.count(f"429 {reason}")
            if int(hdrs.get("retry-after", "0")) < 1:
                out.retry_after_missing += 1
        else:
            out.count(str(status))

    while not stop.is_set():
        await asyncio.sleep(max(0.0, out.started + out.sent / rate - time.monotonic()))
        if places is not None:
            await places.acquire()
        tasks.append(asyncio.create_task(one()))
        out.sent += 1
    out.stopped = time.monotonic()
    await asyncio.gather(*tasks)
    for c in pool:
        c.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="flood a classify route; prints a Flood as JSON")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--body", type=Path, required=True, help="file with the request body")
    p.add_argument("--key", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests/s")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    a = p.parse_args()
    os.nice(a.nice)
    headers = {"authorization": f"Bearer {a.key}", "content-type": "application/json"}

    async def run() -> Flood:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(a.seconds, stop.set)
        return await flood(a.port, a.path, a.body.read_bytes(), headers, a.rate, stop)

    print(json.dumps(asdict(asyncio.run(run()))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
