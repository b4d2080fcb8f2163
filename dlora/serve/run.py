"""Running the app: `serve` (uvicorn in this thread, `dlora serve`) and `BackgroundServer`
(uvicorn on a background thread with a free loopback port, for tests and benchmarks)."""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

from ..errors import DloraError
from .app import create_app
from .engine import ServingEngine


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (as uvicorn binds it); DloraError, in one line, when the
    address is taken or cannot be bound, so `dlora serve` fails before it builds anything."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise DloraError(f"--host {host} --port {port}: the address {what}; stop what holds it or "
                         "choose another --port") from None
    return sock


def serve(engine: ServingEngine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None) -> None:
    """Run the server in this thread until interrupted (`dlora serve`); `sock`: a socket
    bound already (`bind_socket`), else host:port is bound now."""
    import uvicorn

    if sock is None:
        sock = bind_socket(host, port)
    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """The server on a background thread (tests, benchmarks): `with BackgroundServer(engine) as s:`
    then talk to `s.url`. Port 0 picks a free port."""

    def __init__(self, engine: ServingEngine, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.engine, self.host, self.port = engine, host, port
        config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, name="dlora-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
