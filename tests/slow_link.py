"""A TCP proxy that makes a link slow: each direction delivers every byte ``latency_s`` after it
arrived, at most ``rate`` bytes per second (0: no limit). Put between a job and the moto S3 server,
it makes a checkpoint upload as slow as a distant store, with no hook in the code under test
(tests/test_checkpoint_async.py, benchmarks/bench_checkpoint.py).

Pieces go out at most 16 KB at a time, so no side ever waits long without a byte: the AWS SDK gives
up on a request after 3 s without one.
"""
from __future__ import annotations

import queue
import socket
import threading
import time

PIECE = 16 * 1024


class SlowLink:
    def __init__(self, target_port: int, latency_s: float = 0.0, rate: float = 0.0, host: str = "127.0.0.1"):
        self.target, self.host, self.latency_s, self.rate = target_port, host, latency_s, rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://{host}:{self.port}"
        threading.Thread(target=self._serve, name="slow-link", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target))
            except OSError:
                client.close()
                continue
            left = [2]  # directions still open; the sockets close with the last
            lock = threading.Lock()

            def closed(pair=(client, upstream), left=left, lock=lock) -> None:
                with lock:
                    left[0] -= 1
                    if left[0]:
                        return
                for s in pair:
                    s.close()

            for src, dst in ((client, upstream), (upstream, client)):
                q: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._deliver, args=(q, dst, closed), daemon=True).start()

    @staticmethod
    def _read(src: socket.socket, q: queue.SimpleQueue) -> None:
        while True:
            try:
                data = src.recv(PIECE)
            except OSError:
                data = b""
            q.put((time.monotonic(), data))
            if not data:
                return

    def _deliver(self, q: queue.SimpleQueue, dst: socket.socket, closed) -> None:
        try:
            self._pace(q, dst)
        finally:
            closed()

    def _pace(self, q: queue.SimpleQueue, dst: socket.socket) -> None:
        free_at = 0.0  # when the link is free again (the rate limit)
        while True:
            arrived, data = q.get()
            due = max(arrived + self.latency_s, free_at)
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)  # the other side's end, passed on
                except OSError:
                    pass
                return
            free_at = max(due, time.monotonic()) + (len(data) / self.rate if self.rate else 0.0)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
