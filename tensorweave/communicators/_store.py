"""A tiny TCP key-value store for rendezvous: rank 0 serves, every rank sets and waits for keys.

It carries a few bytes per run (the NCCL unique id, timeout reports), never tensors. ``get`` blocks until the key
is set or the timeout passes; connecting retries until the timeout, since rank 0 may start last.
Address: option ``store="HOST:PORT"`` or env ``TENSORWEAVE_STORE`` (``tensorweave launch`` sets it).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from ..core.spmd import ENV_STORE
from ..errors import CollectiveError, CollectiveTimeoutError

__all__ = ["ENV_STORE", "TcpStore", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CollectiveError(f"store address {text!r} must be HOST:PORT, e.g. 127.0.0.1:29500")
    return host, int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("store connection closed")
        data += chunk
    return data


def _send_blob(sock: socket.socket, blob: bytes) -> None:
    sock.sendall(struct.pack("!I", len(blob)) + blob)


def _recv_blob(sock: socket.socket) -> bytes:
    return _recv_exact(sock, struct.unpack("!I", _recv_exact(sock, 4))[0])


class TcpStore:
    """Client (and, on the serving rank, server) of the store. Requests: b"S" key value -> b"K"; b"G" key -> value."""

    def __init__(self, address: str, serve: bool, timeout: float) -> None:
        self.host, self.port = parse_address(address)
        self.timeout = timeout
        self._data: dict[bytes, bytes] = {}
        self._cond = threading.Condition()
        self._server: socket.socket | None = None
        if serve:
            try:
                self._server = socket.create_server((self.host, self.port), reuse_port=False)
            except OSError as e:
                raise CollectiveError(f"store: cannot listen on {address}: {e.strerror or e}") from None
            threading.Thread(target=self._accept, daemon=True, name="tw-store").start()
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=max(0.1, deadline - time.monotonic()))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as e:
                if time.monotonic() > deadline:
                    raise CollectiveTimeoutError(
                        f"store: nobody answers at {self.host}:{self.port} after {self.timeout:g} s "
                        f"({e.strerror or e}); is rank 0 running, with the same store address?"
                    ) from None
                time.sleep(0.05)

    # --- server -------------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    op, key = _recv_exact(conn, 1), _recv_blob(conn)
                    if op == b"S":
                        value = _recv_blob(conn)
                        with self._cond:
                            self._data[key] = value
                            self._cond.notify_all()
                        conn.sendall(b"K")
                    else:
                        with self._cond:
                            self._cond.wait_for(lambda k=key: k in self._data)  # type: ignore[misc]
                            value = self._data[key]
                        _send_blob(conn, value)
            except (ConnectionError, OSError):
                return

    # --- client -------------------------------------------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        self._sock.settimeout(self.timeout)
        self._sock.sendall(b"S")
        _send_blob(self._sock, key.encode())
        _send_blob(self._sock, value)
        _recv_exact(self._sock, 1)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``, waiting until some rank sets it; CollectiveTimeoutError after the timeout."""
        wait = self.timeout if timeout is None else timeout
        self._sock.sendall(b"G")
        _send_blob(self._sock, key.encode())
        self._sock.settimeout(wait)
        try:
            return _recv_blob(self._sock)
        except TimeoutError:
            self._sock.close()  # the pending request would answer the next get: start a fresh connection
            self._sock = self._connect()
            raise CollectiveTimeoutError(f"store: key {key!r} was not set within {wait:g} s") from None

    def close(self) -> None:
        self._sock.close()
        if self._server is not None:  # shutdown first: a thread blocked in accept() keeps a plain close() waiting
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
