"""fedsynsam on a real Flower deployment: a SuperLink and SuperNodes on 127.0.0.1, started by the
tests with free ports and always torn down (the federation fixture checks nothing is left).

The Flower run of a config equals the in-process run of the same config bit for bit
(``OMP_NUM_THREADS=1`` in every Flower process, one torch thread here); broken clients cost
only themselves, and their error-feedback state does not advance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("flwr")

from _support import FLOWER_NODES, strip_seconds  # noqa: E402

from fedsynsam.config import Config  # noqa: E402
from fedsynsam.flower import deploy  # noqa: E402
from fedsynsam.flower.deploy import FlowerRunError, LocalFederation, flwr_bin  # noqa: E402
from fedsynsam.flower.settings import AppSettings, app_config, from_run_config, write_app  # noqa: E402
from fedsynsam.rounds import RoundResult  # noqa: E402
from fedsynsam.trainer import Trainer  # noqa: E402

NODES = FLOWER_NODES


def _cfg(**kw) -> Config:
    base = dict(rounds=4, clients=NODES, per_round=2, syn_min_models=3, syn_period=2, syn_iters=5)
    return Config(**{**base, **kw}).validate()


def _flower_run(fed, tmp_path, cfg, **app) -> list[dict]:
    out = tmp_path / "out"
    write_app(tmp_path / "app", cfg, AppSettings(out=str(out), connect_timeout=90, **app))
    fed.run(tmp_path / "app", timeout=600)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _in_process(cfg, clients=None) -> tuple[list[dict], Trainer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, log=lambda line: None)
        return trainer.run(progress=False, clients=clients and clients(trainer)), trainer
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "algorithm, compressor, extra",
    [
        ("fedavg", "topk", {}),
        ("fedsynsam", "sign", {}),
        ("fedavg", "3sfc", {"sfc_iters": 5}),
        ("fedavg", "powersgd", {}),
    ],
)
def test_flower_run_equals_the_in_process_run(federation, tmp_path, algorithm, compressor, extra):
    # FedSynSAM needs 4 rounds to use its distilled set; 3 show the others' state carried over
    cfg = _cfg(algorithm=algorithm, compressor=compressor, rounds=4 if algorithm == "fedsynsam" else 3, **extra)
    flower = _flower_run(federation, tmp_path, cfg)
    local, trainer = _in_process(cfg)
    assert strip_seconds(flower) == strip_seconds(local)
    if compressor == "3sfc":  # the nodes' encode cosines came back and agree with the in-process ones
        assert all(0 < r["encode_cos"] <= 1 for r in flower)
    if algorithm == "fedsynsam":
        assert flower[-1]["perturbation"] == "synthetic"  # the nodes used the distilled set
    final = torch.load(tmp_path / "out" / "final_model.pt", weights_only=True)["w"]
    assert torch.equal(final, trainer.state.w)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in local)


def _dropping(failures: dict[tuple[int, int], str]):
    """In-process clients where ``(round, client)`` of ``failures`` fail: their payloads are dropped
    and their error-feedback residuals restored (what the Flower run must do)."""

    def make(trainer: Trainer):
        def clients(plan):
            dropped = [c for c in plan.clients if (plan.round + 1, c) in failures]
            saved = {c: trainer.uplink.residual(f"client{c}") for c in dropped}
            saved = {c: None if r is None else r.clone() for c, r in saved.items()}
            result = trainer.run_clients(plan)
            for c, r in saved.items():
                if r is None:
                    trainer.uplink.reset(f"client{c}")
                else:
                    trainer.uplink.residuals[f"client{c}"].copy_(r)
            keep = [j for j, c in enumerate(plan.clients) if c not in dropped]
            return RoundResult(
                [result.payloads[j] for j in keep],
                [result.losses[j] for j in keep],
                result.downlink_bytes,
                failed=[{"client": c, "reason": failures[(plan.round + 1, c)]} for c in dropped],
            )

        return clients

    return make


def test_faults_cost_one_client_and_do_not_advance_its_error_feedback(federation, tmp_path):
    # round 2: every client fails (the model is kept); then one fault of each kind; hang last
    faults = "raise:0@2,flip:1@2,truncate:2@2,numel:0@3,kind:1@4,truncate:0@4,hang:2@5"
    cfg = _cfg(algorithm="fedavg", compressor="topk", rounds=5, per_round=NODES)
    # round_timeout: twice the slowest honest round seen on 2 loaded cores (13 s); round 5 waits it out
    flower = _flower_run(federation, tmp_path, cfg, round_timeout=25.0, inject_faults=faults)
    expected = {
        (2, 0): "injected fault",
        (2, 1): "checksum mismatch",
        (2, 2): "truncated",
        (3, 0): "entries; expected",
        (4, 1): "payload is 'sign'",
        (4, 0): "truncated",
        (5, 2): "no reply within round_timeout=25s",
    }
    for (rnd, client), text in expected.items():
        failed = {f["client"]: f["reason"] for f in flower[rnd - 1].get("failed_clients", [])}
        assert client in failed and text in failed[client], (rnd, client, failed)
    assert [len(r.get("failed_clients", [])) for r in flower] == [0, 3, 1, 2, 1]
    # the round with no valid reply kept the model and says so
    assert flower[1]["train_loss"] is None and flower[1]["uplink_bytes"] == 0
    assert flower[1]["test_acc"] == flower[0]["test_acc"] and flower[1]["test_loss"] == flower[0]["test_loss"]
    # every other number equals an in-process run that drops the same payloads and restores the
    # failed clients' residuals: the nodes' error feedback did not advance on a failed round
    local, _ = _in_process(cfg, _dropping(expected))
    assert _without_reasons(strip_seconds(flower)) == _without_reasons(strip_seconds(local))


def _wait_until(done, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} within {timeout:g}s"
        time.sleep(0.1)


def _wait_for_rounds(out, rounds: int, timeout: float = 300.0) -> None:
    metrics = out / "metrics.jsonl"
    _wait_until(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= rounds,
        f"round {rounds} did not finish",
        timeout,
    )


def test_a_run_resumes_after_kill_9_of_its_superlink_and_a_restarted_supernode(tmp_path):
    """Round 2: SuperNode 1 is killed (kill -9) while it works on its message and started again;
    the round records client 1 as failed and the run goes on, client 1 on its new node. After
    round 3 the SuperLink is killed (kill -9), the whole federation is gone; a new one on the same
    node state folders resumes the run from its checkpoint. The 4 rounds equal an uninterrupted
    in-process run with client 1's round-2 payload dropped: every node continued from its saved
    residual (no state lost), the restarted one included."""
    cfg = _cfg(algorithm="fedavg", compressor="topk", rounds=4, per_round=NODES)
    out, nodes = tmp_path / "out", tmp_path / "nodes"
    # round_timeout: twice the slowest honest round seen on 2 loaded cores (13 s); round 2 waits it out
    app = AppSettings(out=str(out), connect_timeout=90, round_timeout=25.0, inject_faults="hang:1@2")
    write_app(tmp_path / "app", cfg, app)
    env = {"OMP_NUM_THREADS": "1"}
    with LocalFederation(NODES, tmp_path / "fed1", env=env, state_dir=nodes) as fed:
        failure = []
        run = threading.Thread(target=lambda: failure.append(_raises(fed.run, tmp_path / "app", timeout=600)))
        run.start()
        try:
            _wait_for_rounds(out, 1)
            # node 1 saved its round-2 state and now hangs in its (injected) work
            _wait_until(lambda: any(nodes.glob("node-1/run-*/client-1.round-1.state")), "no round-2 state", 60.0)
            fed.nodes[1].kill()
            fed.nodes[1].wait()
            fed.nodes[1] = fed.add_supernode(1, name="supernode-1-again")
            _wait_for_rounds(out, 3)
            fed.procs[0].kill()  # the SuperLink
        finally:
            run.join(timeout=120)
        assert failure and isinstance(failure[0], FlowerRunError), failure
        assert "partition 1 is now on SuperNode" in (fed.workdir / "run-1.log").read_text()
    assert fed.alive() == []
    assert len(out.joinpath("metrics.jsonl").read_text().splitlines()) == 3
    write_app(tmp_path / "app", cfg, dataclasses.replace(app, resume=True))
    with LocalFederation(NODES, tmp_path / "fed2", env=env, state_dir=nodes) as fed:
        fed.run(tmp_path / "app", timeout=600)
    flower = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in flower] == list(range(1, 5))
    assert [f["client"] for f in flower[1]["failed_clients"]] == [1]
    unexpected = [
        {k: r[k] for k in ("round", "failed_clients", "client_state_lost") if k in r}
        for i, r in enumerate(flower)
        if (i >= 2 and "failed_clients" in r) or "client_state_lost" in r
    ]
    assert not unexpected, unexpected
    local, _ = _in_process(cfg, _dropping({(2, 1): "killed"}))
    assert _without_reasons(strip_seconds(flower)) == _without_reasons(strip_seconds(local))


def _raises(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:
        return e
    return None


def _without_reasons(records):
    return [{**r, "failed_clients": sorted(f["client"] for f in r.get("failed_clients", []))} for r in records]


def test_a_bad_run_config_fails_fast_with_the_setting_named(federation, tmp_path):
    write_app(tmp_path / "app", _cfg(), AppSettings(out=str(tmp_path / "out")))
    (tmp_path / "bad.toml").write_text("rounds = 0\n")
    tic = time.monotonic()
    with pytest.raises(FlowerRunError, match="rounds must be an integer >= 1"):
        federation.run(tmp_path / "app", tmp_path / "bad.toml", timeout=120)
    assert time.monotonic() - tic < 60
    (tmp_path / "bad.toml").write_text('algorithm = "dppf"\n')
    with pytest.raises(FlowerRunError, match="dppf"):
        federation.run(tmp_path / "app", tmp_path / "bad.toml", timeout=120)


def test_too_few_supernodes_is_a_bounded_clear_error(federation, tmp_path):
    write_app(tmp_path / "app", _cfg(clients=NODES + 1), AppSettings(out=str(tmp_path / "out"), connect_timeout=3))
    with pytest.raises(FlowerRunError, match="num-partitions"):
        federation.run(tmp_path / "app", timeout=120)


def test_a_port_in_use_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(deploy, "free_port", lambda: port)
        fed = LocalFederation(1, tmp_path, startup_timeout=20)
        tic = time.monotonic()
        try:
            with pytest.raises(FlowerRunError, match=f"127.0.0.1:{port}"):
                fed.start()
            assert time.monotonic() - tic < 90
            assert fed.alive() == []
        finally:  # also when start() wrongly succeeds: nothing outlives the test
            fed.stop()


def test_a_supernode_pointed_at_no_superlink_gives_up(tmp_path):
    dead = deploy.free_port()
    fed = LocalFederation(1, tmp_path)  # for its environment marker: every child is found and ended
    log = tmp_path / "supernode.log"
    tic = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [flwr_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{dead}", "--port",
             str(deploy.free_port()), "--max-retries", "2", "--max-wait-time", "10"],
            env=fed.env, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
        fed.stop()
    assert rc != 0 and time.monotonic() - tic < 60
    assert "could not establish a connection to the SuperLink" in log.read_text()
    assert fed.alive() == []


def test_sigterm_to_the_owner_still_tears_the_federation_down(tmp_path):
    """``timeout`` or a CI runner ends a process with SIGTERM: the ``with`` still unwinds."""
    script = (
        "import sys, time\n"
        "from fedsynsam.flower.deploy import LocalFederation\n"
        "with LocalFederation(1, sys.argv[1]) as fed:\n"
        "    print(fed.token, flush=True)\n"
        "    time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        token = owner.stdout.readline().strip()
        assert token, "the federation did not start"
        assert deploy.running_pids(token)
        owner.terminate()
        owner.wait(timeout=30)
    finally:
        owner.kill()
    deadline = time.monotonic() + 10
    while deploy.running_pids(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = deploy.running_pids(token)
    for pid in survivors:  # a failing run of this test leaves nothing either
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_tls_with_supernode_auth_admits_registered_nodes_only(tmp_path):
    """TLS (a CA and a certificate for 127.0.0.1 made here) and ``--enable-supernode-auth`` with
    each node's key registered: a SuperNode without a key, or with a key nobody registered, is
    refused and the run, started with ``fedsynsam flower run --root-certificates``, is the
    in-process run to the bit."""
    cfg = Config(algorithm="fedavg", compressor="topk", rounds=2, clients=2, per_round=2).validate()
    with LocalFederation(2, tmp_path / "fed", env={"OMP_NUM_THREADS": "1"}, secure=True) as fed:
        no_key = fed.add_supernode(0, name="no-key")
        stranger = fed.add_supernode(1, key=fed.make_key("stranger"), name="stranger")
        for proc, name, why in ((no_key, "no-key", "must be registered"), (stranger, "stranger", "Failed to activate")):
            assert proc.wait(timeout=60) != 0, f"the SuperLink admitted the {name} SuperNode"
            assert why in (fed.workdir / f"{name}.log").read_text()
        flags = ["--algorithm", "fedavg", "--compressor", "topk", "--rounds", "2", "--clients", "2"]
        r = subprocess.run(
            [sys.executable, "-m", "fedsynsam", "flower", "run", "--superlink", f"127.0.0.1:{fed.port}",
             "--root-certificates", str(fed.tls.ca), "--out", str(tmp_path / "out"), "--per-round", "2", *flags],
            env=fed.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert fed.alive() == []
    flower = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert strip_seconds(flower) == strip_seconds(_in_process(cfg)[0])


def test_cli_refuses_bad_flower_settings_before_starting_anything(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fedsynsam", "flower", *args], capture_output=True, text=True)

    r = cli("run", "--superlink", "10.1.2.3:9092", "--insecure", "--out", str(tmp_path))
    assert r.returncode == 2 and "only on loopback" in r.stderr
    r = cli("run", "--superlink", "127.0.0.1:9092", "--insecure", "--out", str(tmp_path), "--rounds", "0")
    assert r.returncode == 2 and "rounds must be an integer >= 1" in r.stderr
    r = cli("demo", "--out", str(tmp_path), "--algorithms", "dppf")
    assert r.returncode == 2 and "dppf" in r.stderr
    r = cli("demo", "--out", str(tmp_path), "--round-timeout", "-1")
    assert r.returncode == 2 and "round_timeout must be" in r.stderr


def test_unset_settings_survive_the_run_config():
    """TOML has no null: the app's run config writes an unset setting as "" and reads it back unset."""
    values = app_config()  # the defaults: data_dir and error_feedback unset
    assert values["data_dir"] == "" and values["error_feedback"] == ""
    cfg, _ = from_run_config(values)
    assert cfg.data_dir is None and cfg.error_feedback is True  # resolved per compressor
    cfg, _ = from_run_config({**values, "compressor": "qsgd"})
    assert cfg.error_feedback is False
