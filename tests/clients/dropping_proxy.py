"""A TCP proxy on 127.0.0.1 in front of a real server, which loses a keep-alive connection on cue.

The race it makes certain: a client reuses a pooled keep-alive connection just as the server closes
it. httpx (httpcore) looks at an idle connection before reusing it and drops one the server has
already closed, so against a server with a short keep-alive timeout the race is rare, and a test
built on it would pass with or without the SDK's retry. This proxy relays HTTP/1.1 exchanges one at a
time over one upstream connection per client connection; `lose_next(when, close)` makes it end the
next request that arrives on a reused connection without a reply:

- `when="unsent"`: close before forwarding it. The server never sees the request: from the client's
  side exactly a keep-alive connection the server closed as the request went out.
- `when="processed"`: forward it, wait for the server's reply, throw the reply away and close. The
  server acted on the request; the client cannot tell this from "unsent".
- `close="fin"`: an orderly close (httpx: RemoteProtocolError "Server disconnected without sending a
  response"); `close="rst"`: a reset (httpx: ReadError "Connection reset by peer").

Messages are framed by Content-Length (what httpx and uvicorn send here); chunked bodies are refused.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

When = Literal["unsent", "processed"]
Close = Literal["fin", "rst"]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # without the query string
    connection: int  # which client connection it came on: 1, 2, ... in accept order
    lost: When | None  # how the proxy lost it; None: relayed, reply and all


class _Reader:
    """Reads whole HTTP/1.1 messages from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _more(self) -> bool:
        data = self.sock.recv(1 << 16)
        self.buf += data
        return bool(data)

    def message(self, reply_to: str | None = None) -> bytes | None:
        """The next request (`reply_to` None) or the response to a `reply_to` request, as raw bytes;
        None when the peer closed between messages."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                if not self.buf:
                    return None
                raise ConnectionError("peer closed inside a message head")
        end = self.buf.index(b"\r\n\r\n") + 4
        head = self.buf[:end].decode("latin-1").lower()
        if "transfer-encoding: chunked" in head:
            raise NotImplementedError("chunked bodies: not needed by these tests")
        length = re.search(r"\r\ncontent-length: *(\d+)", head)
        size = int(length.group(1)) if length else 0  # no length: no body (GET, 204)
        while len(self.buf) < end + size:
            if not self._more():
                raise ConnectionError("peer closed inside a message body")
        message, self.buf = self.buf[: end + size], self.buf[end + size :]
        return message


class DroppingProxy:
    """`DroppingProxy(server_url)`; point the client at `.url`; `.seen` lists every request it got."""

    def __init__(self, upstream_url: str) -> None:
        up = urlsplit(upstream_url)
        self._upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.seen: list[Seen] = []
        self._lose: tuple[When, Close] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def lose_next(self, when: When, close: Close = "fin") -> None:
        """Lose the next request that arrives on a reused (kept-alive) connection, once."""
        with self._lock:
            self._lose = (when, close)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._relay, args=(conn, len(self._threads)), daemon=True)
            self._threads.append(t)
            t.start()

    def _relay(self, client: socket.socket, connection: int) -> None:
        client.settimeout(0.05)  # to notice close(); a slow read just loops
        with client, socket.create_connection(self._upstream) as server:
            from_client, from_server = _Reader(client), _Reader(server)
            for n in range(1, 1 << 30):
                request = self._next_request(from_client)
                if request is None:
                    return
                method, target = request.split(b" ", 2)[:2]
                with self._lock:
                    lose = self._lose if n > 1 else None  # only a reused connection can be stale
                    if lose is not None:
                        self._lose = None
                    seen = Seen(method.decode(), target.decode().split("?")[0], connection, lose and lose[0])
                    self.seen.append(seen)
                if lose is None or lose[0] == "processed":
                    server.sendall(request)
                    reply = from_server.message(reply_to=seen.method)
                    assert reply is not None, f"the server closed instead of answering {seen}"
                if lose is not None:
                    if lose[1] == "rst":  # SO_LINGER 0: close() sends RST instead of FIN
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                client.sendall(reply)

    def _next_request(self, reader: _Reader) -> bytes | None:
        while not self._stop.is_set():
            try:
                return reader.message()
            except TimeoutError:
                continue  # idle keep-alive connection; what was read so far stays in the buffer
        return None
