"""Run the app with uvicorn in a background thread on a loopback port (tests, `bench serve`)."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    """`with BackgroundServer(app) as url:` -> "http://127.0.0.1:PORT", serving until the block ends.

    The socket is bound before the thread starts (port 0: the OS picks a free one), so there is
    no race for the port. Leaving the block stops accepting, lets in-flight requests finish, runs
    the app's shutdown (which drains the batcher) and joins the thread.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", startup_timeout: float = 60.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this; without it every response waited ~40 ms for the
        # client's delayed ACK (Nagle), which uvicorn's own binding avoids but a passed socket did not.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
