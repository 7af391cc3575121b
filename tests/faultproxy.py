"""A fault-injecting TCP proxy on loopback, for storage outage tests.

``FaultProxy(target_port)`` listens on ``127.0.0.1`` and forwards every connection to
``127.0.0.1:target_port`` (threads + blocking sockets). ``down()`` closes the listener and drops
every live connection (clients see connection refused on connect, reset/disconnected on
connections they hold); ``up()`` listens again on the same port. Nothing binds beyond loopback.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

__all__ = ["FaultProxy"]


def _kill(sock: socket.socket) -> None:
    """Close with RST (linger 0) after waking any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = port
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._gen = 0  # bumped by down(): connections of an older generation are dropped
        self.connections = 0  # accepted so far (all generations)
        self.bytes_down = 0  # bytes forwarded from the target to clients (all connections)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    # -- listener --------------------------------------------------------------------------

    def up(self) -> FaultProxy:
        with self._lock:
            if self._listener is not None:
                return self
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 5
            while True:
                try:
                    ls.bind((self.host, self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        ls.close()
                        raise
                    time.sleep(0.05)
            ls.listen(64)
            ls.settimeout(0.1)
            self.port = ls.getsockname()[1]
            self._listener = ls
            gen = self._gen
            self._accepter = threading.Thread(
                target=self._accept_loop, args=(ls, gen), name="faultproxy-accept", daemon=True
            )
            self._accepter.start()
        return self

    def down(self) -> None:
        """Stop listening and drop every live connection."""
        with self._lock:
            self._gen += 1
            ls, self._listener = self._listener, None
            live, self._live = self._live, set()
        if ls is not None:
            _kill(ls)
        for s in live:
            _kill(s)
        if self._accepter is not None:
            self._accepter.join(timeout=2)
            self._accepter = None

    def close(self) -> None:
        self.down()

    def __enter__(self) -> FaultProxy:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    def down_for(self, seconds: float) -> threading.Thread:
        """``down()`` now, ``up()`` after ``seconds`` (in a background thread, returned)."""
        self.down()

        def later() -> None:
            time.sleep(seconds)
            self.up()

        t = threading.Thread(target=later, name="faultproxy-up-later", daemon=True)
        t.start()
        return t

    # -- forwarding ------------------------------------------------------------------------

    def _accept_loop(self, ls: socket.socket, gen: int) -> None:
        while True:
            with self._lock:
                if self._gen != gen:
                    return
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _kill(client)
                continue
            with self._lock:
                if self._gen != gen:  # went down while connecting
                    _kill(client)
                    _kill(upstream)
                    return
                self._live.update((client, upstream))
                self.connections += 1
            for a, b, down in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(a, b, down), name="faultproxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if down:
                    with self._lock:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.discard(src)
                self._live.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
