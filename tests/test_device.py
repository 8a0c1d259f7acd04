"""The trainer's device option, and its hot loop through the Triton kernels (interpreter on the CPU).

The GPU tests at the bottom run only where torch sees CUDA (CI has no GPU); everything above
runs everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _support import strip_seconds, tiny_config

import fedcomp
from fedsynsam.cli import main
from fedsynsam.config import Config, resolve_device
from fedsynsam.data import load_dataset
from fedsynsam.trainer import Trainer

DIGITS = load_dataset("digits")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def test_auto_picks_the_cpu_without_a_gpu_and_equals_an_explicit_cpu_run():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = Trainer(tiny_config(compressor="sign", device="cpu"), dataset=DIGITS).run(progress=False)
    trainer = Trainer(tiny_config(compressor="sign", device="auto"), dataset=DIGITS)
    assert trainer.state.w.device == resolve_device("auto")
    if not torch.cuda.is_available():
        assert strip_seconds(trainer.run(progress=False)) == strip_seconds(cpu)


@no_cuda
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"device 'cuda' needs a CUDA GPU, .*use --device cpu or auto"):
        Trainer(tiny_config(device="cuda"), dataset=DIGITS)
    assert main(["train", "--out", str(tmp_path / "r"), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert main(["sharpness", str(tmp_path), "--device", "cuda:1"]) == 2


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "CUDA", "tpu", 3])
def test_bad_device_values_name_the_setting(bad):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        Config(device=bad).validate()


def test_a_checkpoint_resumes_under_another_device_setting(tmp_path):
    cfg = tiny_config(rounds=4, algorithm="fedsynsam", compressor="topk", device="cpu")
    full = Trainer(cfg, tmp_path / "full", dataset=DIGITS).run(progress=False)
    Trainer(cfg, tmp_path / "split", dataset=DIGITS).run(progress=False, stop_after=2)
    moved = tiny_config(rounds=4, algorithm="fedsynsam", compressor="topk", device="auto")
    resumed = Trainer(moved, tmp_path / "split", dataset=DIGITS).run(progress=False, resume=True)
    if not torch.cuda.is_available():  # on a GPU the two halves use different kernels
        assert strip_seconds(resumed) == strip_seconds(full)


_RUN = """
import json, sys
import fedcomp
from fedcomp import _backend
from fedsynsam.config import Config
from fedsynsam.trainer import Trainer
cfg = Config(**json.loads(sys.argv[1]))
records = Trainer(cfg).run(progress=False)
print(json.dumps({"backend": _backend.cpu_backend(), "records": records}))
"""


def _run_with_backend(backend: str, cfg: Config) -> dict:
    env = dict(os.environ, FEDCOMP_BACKEND=backend, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(cfg.to_dict())], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "algorithm, compressor", [("fedavg", "topk"), ("fedsynsam", "topk"), ("fedlesam", "randk"), ("fedavg", "none")]
)
def test_the_hot_loop_runs_through_the_triton_kernels_and_equals_the_cpp_backend(algorithm, compressor):
    """Under TRITON_INTERPRET=1 and FEDCOMP_BACKEND=triton a trainer on CPU tensors compresses,
    decodes and aggregates with the Triton kernels; top-k, rand-k and identity are bit-exact, so its
    metrics equal the C++ backend's to the bit."""
    pytest.importorskip("triton")
    cfg = tiny_config(algorithm=algorithm, compressor=compressor, rounds=3, ratio=0.05)
    triton_run = _run_with_backend("triton", cfg)
    cpp_run = _run_with_backend("cpu", cfg)
    assert triton_run["backend"] == "triton" and cpp_run["backend"] == "cpu"
    assert strip_seconds(triton_run["records"]) == strip_seconds(cpp_run["records"])


@pytest.mark.parametrize("compressor", ["sign", "qsgd"])
def test_quantizers_in_the_hot_loop_through_triton_agree_within_fp32(compressor):
    """Sign scales and QSGD norms are block reductions whose fp32 summation order differs between
    backends (each is within fp32 rounding of the reference), so the runs agree closely, not to the bit."""
    pytest.importorskip("triton")
    cfg = tiny_config(compressor=compressor, rounds=3)
    a = _run_with_backend("triton", cfg)["records"]
    b = _run_with_backend("cpu", cfg)["records"]
    assert a[-1]["uplink_bytes"] == b[-1]["uplink_bytes"]
    for ra, rb in zip(a, b):
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-4)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


# -- on a GPU -------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("compressor", ["topk", "sign", "qsgd", "none"])
def test_cuda_run_keeps_everything_on_the_device_and_matches_the_cpu(compressor):
    cfg = tiny_config(compressor=compressor, rounds=3, device="cuda")
    trainer = Trainer(cfg, dataset=DIGITS)
    records = trainer.run(progress=False)
    assert trainer.state.w.is_cuda and trainer.data.x_train.is_cuda
    assert all(r.is_cuda for r in trainer.uplink.state_dict().get("residuals", {}).values())
    cpu = Trainer(tiny_config(compressor=compressor, rounds=3, device="cpu"), dataset=DIGITS).run(progress=False)
    for a, b in zip(records, cpu):
        assert a["uplink_bytes"] == b["uplink_bytes"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)


@needs_cuda
@pytest.mark.parametrize(
    "make",
    [
        lambda: fedcomp.TopK(0.01),
        lambda: fedcomp.Sign(512),
        lambda: fedcomp.QSGD(4, 512, seed=1),
        lambda: fedcomp.RandK(0.01, seed=3),
    ],
)
@pytest.mark.parametrize("n", [1_000_003, 26_122], ids=["one-by-one", "stacked"])
def test_compress_to_aggregate_has_no_host_sync_on_cuda(make, n):
    """compress (EF) -> [wire boundary] -> aggregate with CUDA sync debug mode set to error: one
    call per client at 10^6 entries, and the one-launch batched ops on a [clients, n] stack
    (compress_many; rows of the shared residual buffer, named by a device tensor)."""
    clients = 4
    ef = fedcomp.ErrorFeedback(make())
    xs = torch.randn(clients, n, device="cuda")
    keys = [f"client{i}" for i in range(clients)]
    ef.compress_many(xs, keys)  # the first call creates the residuals (allocation only)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        payloads = ef.compress_many(xs, keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    wires = [p.to_bytes() for p in payloads]  # the wire boundary: device -> host
    received = [fedcomp.Payload.from_bytes(w, device="cuda") for w in wires]  # host -> device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fedcomp.aggregate(received)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch.stack([p.decode() for p in received]).mean(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
