"""A warm worker process per SuperNode, so that a message does not pay for importing torch.

Flower (1.42) starts a fresh ``flwr-clientapp`` process for every message a SuperNode gets.
Importing torch, fedcomp and fedsynsam in it took about 3 s of CPU; five of them side by
side on 2 cores made most of a round. So the ClientApp (:mod:`.client_app`) imports only
Flower and this module, and hands each ``train`` message to a long-lived worker of its
SuperNode, which has the heavy modules, the node's data partition and the model already in
memory (:mod:`.node` does the work, the same code either way).

* **One worker per SuperNode**, found at a Unix socket named after the node's id and its
  SuperExec's process id, in a folder only this user can enter
  (``$FEDSYNSAM_WORKER_DIR``, else ``$XDG_RUNTIME_DIR``, else the temp folder, then
  ``fedsynsam-UID/``). The first message of a node (the server's discovery query) starts it
  in the background; a message that finds no worker starts one and waits for it.
* **Nothing lives only in the worker.** The request carries the message's record, the node's
  context state, the run config and the node config; the reply carries the reply record and
  the new state, which the ClientApp stores in the context as before. A worker that dies
  loses nothing: the next message starts a new one.
* **It ends** when its SuperExec (so its SuperNode) is gone, or after ``IDLE_EXIT`` seconds
  without a message. Its output goes to ``<socket>.log``.
* **Only Flower records cross the socket** (``ConfigRecord.deflate`` / ``inflate``:
  protobuf, no pickle), framed by an 8-byte length.

A SuperNode started with ``--node-config "... warm-worker=false"`` runs every message in
the ClientApp process itself (slower, and the same results).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from flwr.app import ConfigRecord

__all__ = ["IDLE_EXIT", "START_TIMEOUT", "socket_path", "start", "call", "serve", "enabled"]

IDLE_EXIT = 1800.0  # seconds without a message after which a worker ends
START_TIMEOUT = 120.0  # seconds a message waits for a new worker to listen (it imports torch)
_HEADER = struct.Struct("!Q")


def _folder() -> Path:
    base = os.environ.get("FEDSYNSAM_WORKER_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / f"fedsynsam-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user and be closed to others (chmod 700)")
    return folder


def socket_path(node_id: int, superexec_pid: int) -> Path:
    """The socket of the worker of SuperNode ``node_id`` whose SuperExec is ``superexec_pid``."""
    path = _folder() / f"node-{node_id}-{superexec_pid}.sock"
    if len(os.fsencode(path)) > 100:  # sun_path holds 104-108 bytes, depending on the system
        raise ValueError(
            f"the warm worker's socket path is too long for a Unix socket: {path}; "
            "set FEDSYNSAM_WORKER_DIR to a short folder"
        )
    return path


def enabled(node_config) -> bool:
    """Whether the node config allows the warm worker (``warm-worker``, default true) and this
    system has what it needs (Unix sockets and ``fcntl`` locks: not on Windows)."""
    value = node_config.get("warm-worker", True)
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"node-config warm-worker must be true or false; got {value!r}")
        value = value.lower() in ("true", "1")
    return bool(value) and hasattr(socket, "AF_UNIX") and os.name == "posix"


# -- framing -------------------------------------------------------------------------
def _send(conn: socket.socket, record: ConfigRecord) -> None:
    data = record.deflate()
    conn.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the connection closed {n - left} bytes into a {n}-byte frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> ConfigRecord:
    first = conn.recv(1)
    if not first:
        raise EOFError("closed before a request: a check that the worker listens")
    (n,) = _HEADER.unpack(first + _recv_exact(conn, _HEADER.size - 1))
    return ConfigRecord.inflate(_recv_exact(conn, n))


# -- the ClientApp's side ------------------------------------------------------------
def _connect(path: Path, timeout: float) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except BaseException:
        conn.close()
        raise
    return conn


def _listening(path: Path) -> bool:
    try:
        _connect(path, 1.0).close()
    except OSError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def start(path: Path, watch_pid: int, *, wait: bool = True) -> None:
    """Start the worker of ``path`` unless one listens there or is starting (its ``.pid`` file);
    with ``wait``, return once it listens (or died, or ``START_TIMEOUT`` passed).

    One caller at a time decides (a lock file), so two messages never start two workers."""
    import fcntl  # POSIX only, as the worker is (see enabled)

    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _listening(path):
            return
        proc, pid = None, _read_pid(path.with_suffix(".pid"))
        if pid is None or not _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a dead worker's socket
            with open(path.with_suffix(".log"), "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fedsynsam.flower.worker", str(path), str(watch_pid)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # it outlives this ClientApp process
                    close_fds=True,
                )
            path.with_suffix(".pid").write_text(str(proc.pid))
            pid = proc.pid
        if not wait:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists() and time.monotonic() < deadline:
            if (proc.poll() is not None) if proc is not None else not _alive(pid):
                break  # it died starting: the caller's connect fails and says so
            time.sleep(0.05)


def call(path: Path, watch_pid: int, request: ConfigRecord, timeout: float) -> ConfigRecord:
    """Send ``request`` to the worker at ``path`` (starting it if needed); its reply record.

    Raises ``RuntimeError`` with the worker's error if the work raised there, and
    ``ConnectionError`` / ``TimeoutError`` if the worker died or took longer than ``timeout``.
    """
    for attempt in range(3):
        try:
            conn = _connect(path, timeout)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if attempt == 2:
                raise ConnectionError(
                    f"no warm worker listens at {path}; its log: {path.with_suffix('.log')}"
                ) from None
            start(path, watch_pid)
    with conn:
        _send(conn, request)
        reply = _recv(conn)
    if "error" in reply:
        raise RuntimeError(f"{reply['error']} (in the warm worker {path.name})")
    return reply


# -- the worker's side ---------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(signum, frame):
    raise SystemExit(f"signal {signum}")


def serve(path: Path, watch_pid: int, handle, idle_exit: float = IDLE_EXIT) -> None:
    """Answer requests at ``path`` one at a time with ``handle(request) -> reply`` until
    ``watch_pid`` ends, ``idle_exit`` seconds pass without one, or SIGTERM / SIGINT.

    On the way out it removes its socket, ``.pid`` and ``.lock`` files, and its ``.log`` unless a request
    failed (the log then keeps the traceback)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    server.bind(str(tmp))
    server.listen(8)
    os.replace(tmp, path)  # appears listening, never half-made
    inode = path.stat().st_ino
    server.settimeout(1.0)
    last, failed = time.monotonic(), 0
    print(f"fedsynsam warm worker {os.getpid()} listening at {path}", flush=True)
    try:
        while _alive(watch_pid) and time.monotonic() - last < idle_exit:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    request = _recv(conn)
                except EOFError:
                    continue
                try:
                    reply = handle(request)
                except Exception as e:  # the ClientApp re-raises it, so Flower reports it to the server
                    traceback.print_exc()
                    failed += 1
                    reply = ConfigRecord({"error": f"{type(e).__name__}: {e}"})
                with contextlib.suppress(OSError):  # the ClientApp may have given up
                    _send(conn, reply)
            last = time.monotonic()
    finally:
        server.close()
        print(f"fedsynsam warm worker {os.getpid()} exits ({failed} failed requests)", flush=True)
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # still ours, not a successor's
                kept = () if failed else (path.with_suffix(".log"),)
                for leftover in (path, path.with_suffix(".pid"), path.with_suffix(".lock"), *kept):
                    leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    from .node import handle_request  # the heavy imports: torch, fedcomp, fedsynsam

    serve(Path(sys.argv[1]), int(sys.argv[2]), handle_request)
