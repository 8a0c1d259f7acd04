"""The pieces of a SuperNode's side that need no federation: its saved state on disk
(:class:`fedsynsam.flower.node.NodeStore`), its warm worker (:mod:`fedsynsam.flower.worker`) and
the node-config checks. The federation tests (tests/test_flower.py) run them for real."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord  # noqa: E402

from fedsynsam.flower import partition_of, worker  # noqa: E402
from fedsynsam.flower.node import NodeStore  # noqa: E402

KEY = "0123456789abcdef"


def _state(i: int) -> ConfigRecord:
    return ConfigRecord({"pending": bytes([i]) * 50, "pending_round": i})


def test_the_store_returns_the_newest_state_before_a_round_and_drops_later_ones(tmp_path):
    store = NodeStore(tmp_path, KEY, 3)
    assert store.load(before=0) == (None, None)
    for r in (0, 2, 5):
        store.save(r, _state(r))
    state, lost = store.load(before=5)  # round 5's file is from an abandoned timeline
    assert lost is None and dict(state) == dict(_state(2))
    assert sorted(p.name for p in store.folder.iterdir()) == ["client-3.round-0.state", "client-3.round-2.state"]
    store.prune(keep_from=3)  # a resume can start at round 3 at the earliest: round 2's file is all it needs
    assert [p.name for p in store.folder.iterdir()] == ["client-3.round-2.state"]
    assert NodeStore(tmp_path, KEY, 4).load(before=9) == (None, None)  # another client's files are its own


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
        (lambda b: b[:20], "not a state file"),
        (lambda b: b"garbage" + b[7:], "not a state file"),
    ],
)
def test_a_damaged_state_is_reported_never_used(tmp_path, damage, reason):
    store = NodeStore(tmp_path, KEY, 0)
    store.save(1, _state(1))
    path = store.folder / "client-0.round-1.state"
    path.write_bytes(damage(path.read_bytes()))
    state, lost = store.load(before=2)
    assert state is None and reason in lost and "round 2" in lost


def test_the_store_refuses_a_run_key_that_is_not_hex(tmp_path):
    with pytest.raises(ValueError, match="run_key must be 8-64 hex digits"):
        NodeStore(tmp_path, "../../etc", 0)


def test_partition_and_node_config_errors_name_the_setting():
    assert partition_of({"partition-id": 2, "num-partitions": 4}, 4) == 2
    with pytest.raises(ValueError, match="needs --node-config 'partition-id=I num-partitions=N'"):
        partition_of({}, 4)
    with pytest.raises(ValueError, match="does not fit the run's clients=5"):
        partition_of({"partition-id": 2, "num-partitions": 4}, 5)
    assert (
        worker.enabled({})
        and not worker.enabled({"warm-worker": False})
        and not worker.enabled({"warm-worker": "false"})
    )
    with pytest.raises(ValueError, match="warm-worker must be true or false"):
        worker.enabled({"warm-worker": "maybe"})


def test_a_worker_answers_reports_errors_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSYNSAM_WORKER_DIR", str(tmp_path))
    path = worker.socket_path(12345, os.getpid())

    def handle(request):
        if request["kind"] == "boom":
            raise RuntimeError("it broke")
        return ConfigRecord({"echo": request["x"] * 2})

    server = threading.Thread(target=worker.serve, args=(path, os.getpid(), handle, 5.0))
    server.start()
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert worker.call(path, os.getpid(), ConfigRecord({"kind": "x", "x": 21}), 10)["echo"] == 42
        with pytest.raises(RuntimeError, match="RuntimeError: it broke"):
            worker.call(path, os.getpid(), ConfigRecord({"kind": "boom"}), 10)
    finally:
        server.join(timeout=30)  # idle_exit=5 s
    assert not server.is_alive()
    assert not path.exists() and path.with_suffix(".log").exists() is False


def test_a_real_worker_is_started_on_demand_and_ends_on_sigterm(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSYNSAM_WORKER_DIR", str(tmp_path))
    path = worker.socket_path(777, os.getpid())
    with pytest.raises(RuntimeError, match="unknown request kind 'nope'"):
        worker.call(path, os.getpid(), ConfigRecord({"kind": "nope"}), 120)
    pid = int(path.with_suffix(".pid").read_text())
    try:
        assert path.exists()
        worker.start(path, os.getpid())  # one listens: nothing new starts
        assert int(path.with_suffix(".pid").read_text()) == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists() and not path.with_suffix(".pid").exists()
    assert path.with_suffix(".log").exists()  # a request failed: its log (with the traceback) stays


def test_the_cli_makes_certificates_and_node_keys_flower_accepts(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedsynsam.cli import main

    assert main(["flower", "tls", str(tmp_path / "tls"), "--host", "10.0.0.5", "--host", "link.example.org"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o077 == 0

    assert main(["flower", "node-key", str(tmp_path / "n.key")]) == 0
    assert (tmp_path / "n.key").stat().st_mode & 0o077 == 0
    private = load_ssh_private_key((tmp_path / "n.key").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "n.key.pub").read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers() and public.curve.name == "secp384r1"
    assert main(["flower", "node-key", str(tmp_path / "n.key")]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"discovery_batch": 0}, "discovery_batch must be an integer >= 1"),
        ({"resume": "yes"}, "resume must be true or false"),
        ({"poll_interval": 0}, "poll_interval must be a number of seconds > 0"),
    ],
)
def test_bad_app_settings_name_the_setting(setting, message):
    from fedsynsam.flower.settings import AppSettings

    with pytest.raises(ValueError, match=message):
        AppSettings(**setting).validate()
