"""Running the app under uvicorn: in the foreground (``persona serve``) or on a loopback thread (tests, bench).

uvicorn's own shutdown is the graceful one: on SIGINT/SIGTERM it stops accepting connections, waits
for the requests in flight (streams included), then runs the app's lifespan shutdown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """The listen socket, bound now: a port in use is one line before the model loads, not uvicorn's after it."""
    from persona.core.errors import PersonaError

    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise PersonaError(
            f"--host {host}: not an address of this machine ({error}). Fix: e.g. --host 127.0.0.1."
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise PersonaError(
            f"--port {port}: cannot listen on {host}:{port} ({error.strerror}). Fix: choose another --port, or stop "
            "the process that holds it."
        ) from None
    return sock


def run_server(
    app, *, sock: socket.socket, log_level: str = "info", shutdown_timeout_s: float | None = None
) -> None:
    """Serve ``app`` on the already-bound ``sock`` (see :func:`bind_socket`) until SIGINT/SIGTERM."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s)
    # uvicorn re-raises Ctrl-C once it has shut down gracefully: nothing is left to do then.
    with contextlib.suppress(KeyboardInterrupt), sock:
        uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a background thread; yields the base URL (``http://host:port``).

    The socket is bound here (port 0 = any free port) and handed to uvicorn, so no other process can take
    the port in between. Leaving the block shuts the server down the graceful way.
    """
    if not is_loopback(host):
        raise ValueError(f"serve_in_thread binds loopback addresses only, not {host!r}.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="persona-serve"
    )
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The server did not start (see its log above).")
        time.sleep(0.01)
    try:
        yield f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
