"""A real Flower federation on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

Used by the tests, ``fedsynsam flower demo`` and the benchmark. Every process is started
with free ports, bounded waits and a marker in its environment; :meth:`LocalFederation.stop`
(also on exceptions, via ``with``) ends every process carrying the marker -- including the
SuperExec, ServerApp and ClientApp processes Flower starts detached in their own sessions --
so nothing is left behind. ``--insecure`` is used only here, on the loopback interface, and
not at all with ``secure=True`` (TLS and SuperNode authentication).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

__all__ = [
    "LocalFederation",
    "FlowerRunError",
    "flwr_run",
    "free_port",
    "flwr_bin",
    "LATENCY_ENV",
    "task_poll_interval",
]

# The environment that shortens a round (flwr 1.42): each SuperNode's SuperExec looks for new
# ClientApp tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (default 1; 0.01-60 allowed),
# and with telemetry on every short-lived flwr process may wait on exit to send its event.
LATENCY_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "FLWR_TELEMETRY_ENABLED": "0"}


def task_poll_interval(supernodes: int) -> float:
    """``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for ``supernodes`` SuperNodes sharing one machine.

    Each SuperExec's poll is a request its SuperNode answers: measured here (2 cores, 20 idle
    SuperNodes), polling every 0.1 s kept 1.09 cores busy, every 0.5 s 0.30 and every 1 s 0.22.
    So the interval grows with the node count (0.025 s per node, 0.1 s to 1 s): a message
    waits half an interval on average for its SuperExec, and the machine stays free for work.
    """
    return min(1.0, max(0.1, 0.025 * supernodes))


CONNECTION = "fedsynsam-local"
_MARK = "FEDSYNSAM_FEDERATION"


class FlowerRunError(RuntimeError):
    """A Flower process or run failed; the message ends with the tail of its log."""


def flwr_bin(name: str) -> str:
    """The path of a Flower executable (``flwr``, ``flower-superlink``, ...) next to this Python."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} not found next to {sys.executable}; install Flower: pip install 'fedcomp[flower]'"
        )
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _marked_pids(token: str) -> list[int]:
    """Processes whose environment carries ``token`` (Linux: /proc; elsewhere: none found)."""
    needle = f"{_MARK}={token}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return [p for p in pids if p != os.getpid()]


def running_pids(token: str) -> list[int]:
    """Processes of the federation marked ``token`` that are still running (not zombies)."""
    return [p for p in _marked_pids(token) if _running(p)]


_FAILED = re.compile(r"Exit Code: (\d+)")


def flwr_run(args: list[str], env: dict, log: Path, *, timeout: float, echo=None) -> str:
    """Run a ``flwr run ... --stream`` command line, writing its output to ``log``; returns the text.

    ``flwr run --stream`` returns when a run succeeds, but keeps streaming after the ServerApp
    failed; so a Flower ``Exit Code`` line in the stream ends it too. Raises
    :class:`FlowerRunError` (with the log's tail) on failure or after ``timeout`` seconds.
    """
    deadline, failed_at, lines = time.monotonic() + timeout, None, []
    with log.open("w") as f:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True
        )
        try:
            os.set_blocking(proc.stdout.fileno(), False)
            while True:
                line = proc.stdout.readline()
                if line:
                    lines.append(line)
                    f.write(line)
                    f.flush()
                    if echo is not None:
                        echo(line.rstrip("\n"))
                    if failed_at is None and _FAILED.search(line):
                        failed_at = time.monotonic()
                    continue
                if proc.poll() is not None:
                    rest = proc.stdout.read() or ""
                    lines.append(rest)
                    f.write(rest)
                    break
                now = time.monotonic()
                if failed_at is not None and now > failed_at + 3.0:  # the rest of the report has arrived
                    break
                if now > deadline:
                    raise FlowerRunError(f"flwr run did not finish within {timeout:g}s:\n{_tail(log)}")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if failed_at is not None or proc.returncode != 0:
        raise FlowerRunError(f"the Flower run failed (flwr run exit code {proc.returncode}):\n{_tail(log)}")
    return "".join(lines)


class LocalFederation:
    """``with LocalFederation(4, workdir) as fed: fed.run(app_dir, run_config)``.

    Args:
        supernodes: SuperNodes to start; node ``i`` gets ``partition-id=i num-partitions=supernodes``.
        workdir: folder for the logs (``superlink.log``, ``supernode-I.log``, ``run-K.log``) and
            the Flower configuration (``flwr-home/``).
        env: extra environment for every process (e.g. ``OMP_NUM_THREADS=1``).
        startup_timeout: seconds to wait for the SuperLink to listen.
        secure: TLS and SuperNode authentication instead of ``--insecure``: a CA and a certificate
            for 127.0.0.1 are made in ``workdir/tls/`` (:func:`~fedsynsam.flower.secure.make_tls`),
            the SuperLink runs with ``--enable-supernode-auth``, and each SuperNode gets a key pair
            in ``workdir/keys/`` whose public key is registered (``flwr supernode register``)
            before the node starts with it.
        state_dir: a folder for the nodes' saved state (node ``i`` gets ``state-dir=STATE_DIR/node-i``
            in its node config; see :mod:`fedsynsam.flower.node`), so that a resumed run, or a
            SuperNode started again, continues from it. None: state in memory only.
        node_config: more ``key=value`` pairs for every node's ``--node-config`` (e.g.
            ``"warm-worker=false"``).

    Every process gets :data:`LATENCY_ENV` with the SuperExec poll interval of
    :func:`task_poll_interval`, and ``OMP_NUM_THREADS`` = the machine's cores divided by
    ``supernodes`` (at least 1), unless this process's environment or ``env`` sets them.
    """

    def __init__(
        self,
        supernodes: int,
        workdir,
        *,
        env: dict | None = None,
        startup_timeout: float = 60.0,
        secure: bool = False,
        state_dir=None,
        node_config: str = "",
    ):
        if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < 1:
            raise ValueError(f"supernodes must be an integer >= 1; got {supernodes!r}")
        self.supernodes, self.workdir = supernodes, Path(workdir)
        self.startup_timeout, self.secure, self.tls = startup_timeout, secure, None
        self.nodes: list[subprocess.Popen] = []  # the SuperNodes of partitions 0 .. supernodes-1
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.node_config = node_config
        self.token = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.port: int | None = None
        self.runs = 0
        bindir = str(Path(sys.executable).parent)  # SuperNodes start flower-superexec by name
        # the nodes' warm workers (fedsynsam.flower.worker) put their sockets and logs in a short
        # folder of this federation's, removed with it, unless this environment names one
        self.worker_dir = None
        if "FEDSYNSAM_WORKER_DIR" not in os.environ and "FEDSYNSAM_WORKER_DIR" not in (env or {}):
            self.worker_dir = Path(tempfile.mkdtemp(prefix="fedsynsam-workers-"))
        # N SuperNodes share this machine: split its cores between them unless told otherwise
        threads = str(max(1, (os.cpu_count() or 1) // supernodes))
        self.env = {
            **LATENCY_ENV,
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{task_poll_interval(supernodes):g}",
            "OMP_NUM_THREADS": threads,
            **os.environ,
            **(env or {}),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            **({} if self.worker_dir is None else {"FEDSYNSAM_WORKER_DIR": str(self.worker_dir)}),
            "PYTHONUNBUFFERED": "1",
            _MARK: self.token,
        }

    # -- processes ---------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with log.open("wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _superlink_args(self) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        from .secure import make_tls

        self.tls = make_tls(self.workdir / "tls")
        return [
            "--ssl-ca-certfile",
            str(self.tls.ca),
            "--ssl-certfile",
            str(self.tls.cert),
            "--ssl-keyfile",
            str(self.tls.key),
            "--enable-supernode-auth",
        ]

    def start(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr-home").mkdir(exist_ok=True)
        try:
            link_args = self._superlink_args()
            for attempt in range(3):  # a free port can be taken between the check and the bind
                self.port = free_port()
                log = self.workdir / "superlink.log"
                link = self._spawn(
                    [
                        flwr_bin("flower-superlink"),
                        *link_args,
                        "--disable-runtime-dependency-installation",
                        "--port",
                        str(self.port),
                    ],
                    log,
                )
                deadline = time.monotonic() + self.startup_timeout
                while link.poll() is None and not self._serving(log) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(0.5)  # a bind failure shows up just after uvicorn's first lines
                if link.poll() is None and self._serving(log):
                    break
                self._stop_procs()
                if attempt == 2 or link.poll() is None:
                    raise FlowerRunError(
                        f"flower-superlink did not listen on 127.0.0.1:{self.port} within "
                        f"{self.startup_timeout:g}s (exit code {link.poll()}):\n{_tail(log)}"
                    )
            trust = f'root-certificates = "{self.tls.ca}"' if self.secure else "insecure = true"
            (self.workdir / "flwr-home" / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{trust}\n'
            )
            for i in range(self.supernodes):
                key = self.register(self.make_key(f"node-{i}")) if self.secure else None
                self.nodes.append(self.add_supernode(i, key=key))
        except BaseException:
            self.stop()
            raise
        return self

    def make_key(self, name: str) -> Path:
        """A new SuperNode key pair in ``workdir/keys/`` (not registered); the private key's path."""
        from .secure import make_node_key

        return make_node_key(self.workdir / "keys" / f"{name}.key")[0]

    def register(self, key: Path) -> Path:
        """``flwr supernode register KEY.pub``: the SuperLink admits SuperNodes holding ``key``."""
        log = self.workdir / f"register-{key.stem}.log"
        with log.open("wb") as f:
            done = subprocess.run(
                [flwr_bin("flwr"), "supernode", "register", str(key) + ".pub", CONNECTION],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                timeout=self.startup_timeout,
            )
        if done.returncode != 0:
            raise FlowerRunError(f"flwr supernode register {key}.pub failed:\n{_tail(log)}")
        return key

    def add_supernode(self, partition: int, *, key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        """Start a SuperNode holding ``partition`` (log: ``workdir/NAME.log``, default
        ``supernode-PARTITION``; with the federation's ``state_dir``, that node's state folder).
        On a secure federation it connects over TLS with the private ``key`` (None: no key, which
        the SuperLink refuses)."""
        trust = ["--root-certificates", str(self.tls.ca)] if self.secure else ["--insecure"]
        if key is not None:
            trust += ["--auth-supernode-private-key", str(key)]
        node_config = f"partition-id={partition} num-partitions={self.supernodes}"
        if self.state_dir is not None:
            node_config += f' state-dir="{(self.state_dir / f"node-{partition}").resolve()}"'
        if self.node_config:
            node_config += " " + self.node_config
        return self._spawn(
            [
                flwr_bin("flower-supernode"),
                *trust,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
                "--max-retries",
                "5",
                "--max-wait-time",
                "30",
            ],
            self.workdir / f"{name or f'supernode-{partition}'}.log",
        )

    def _serving(self, log: Path) -> bool:
        """The SuperLink says it serves on our port, and something answers there."""
        try:
            text = log.read_text(errors="replace")
            said = any(f"Uvicorn running on {scheme}://127.0.0.1:{self.port}" in text for scheme in ("http", "https"))
        except OSError:
            return False
        return said and _listening(self.port)

    def run(self, app_dir, run_config=None, *, timeout: float = 900.0, echo=None) -> str:
        """``flwr run APP_DIR`` on this federation, streaming its log; returns the log text.

        ``run_config``: a TOML file of overrides (keys of the app's config). ``echo``: called
        with each output line (e.g. ``print``). Raises :class:`FlowerRunError` if the run fails
        or outlives ``timeout`` seconds.
        """
        for i, proc in enumerate(self.nodes):
            if proc.poll() is not None:
                raise FlowerRunError(
                    f"SuperNode {i} exited (code {proc.returncode}):\n{_tail(self.workdir / f'supernode-{i}.log')}"
                )
        self.runs += 1
        args = [flwr_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if run_config is not None:
            args += ["--run-config", str(run_config)]
        return flwr_run(args, self.env, self.workdir / f"run-{self.runs}.log", timeout=timeout, echo=echo)

    # -- teardown ----------------------------------------------------------------
    def _stop_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        self._wait_procs(5.0)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs, self.nodes = [], []

    def _wait_procs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))

    def alive(self) -> list[int]:
        """Process ids of this federation still running (any depth, detached or not)."""
        return running_pids(self.token)

    def stop(self) -> None:
        """End every process of this federation: SIGTERM, then SIGKILL after 5 s."""
        self._stop_procs()
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = self.alive()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = self.alive()
                time.sleep(0.1)
        if self.worker_dir is not None:
            shutil.rmtree(self.worker_dir, ignore_errors=True)

    def __enter__(self) -> LocalFederation:
        # SIGTERM (``timeout``, a CI runner, ``kill``) would end this process without unwinding
        # the ``with``, leaving the federation behind: turn it into KeyboardInterrupt meanwhile
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return self.start()
        except BaseException:
            self._restore_sigterm()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._restore_sigterm()

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: stopping the local federation")


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
