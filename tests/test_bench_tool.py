"""fedcomp-bench: the CLI on tiny sizes, its JSON / CSV / plot outputs, the GB/s arithmetic,
the cases against the reference, and bad input (one line, exit code 2)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from fedcomp import bench
from fedcomp.bench import CASES, Params, traffic_bytes
from fedcomp.bench import harness as H

TINY = ["--repeat", "2", "--warmup", "0", "--quiet"]


def test_cli_writes_table_json_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench.main(
        ["topk_ef,sign_ef,sign_decode,pipeline_sign", "--sizes", "1000,4097", "--backends", "auto,reference,composite",
         "--dtypes", "fp32,bf16", "--json", str(out), "--csv", str(tmp_path / "b.csv"),
         "--plot", str(tmp_path / "b.png"), *TINY]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# fedcomp-bench:") and "| topk_ef " in printed and "measured bandwidth" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["tool"] == "fedcomp-bench"
    assert {"torch", "triton", "cpu", "threads", "device", "gpu"} <= set(doc["environment"])
    assert set(doc["bandwidth"]) == {"1000", "4097"}
    assert doc["settings"]["ratio"] == 0.01 and doc["settings"]["fresh_inputs"] is False
    rows = doc["rows"]
    fields = {f for f in H.Row.__dataclass_fields__}
    assert all(set(r) == fields for r in rows)
    # dtype-free ops run once (fp32); the pipeline has auto and composite only, and no roofline
    assert sorted({(r["op"], r["dtype"]) for r in rows if r["op"] == "sign_decode"}) == [("sign_decode", "fp32")]
    pipe = [r for r in rows if r["op"] == "pipeline_sign"]
    assert {r["backend"] for r in pipe} == {"auto", "composite"} and all(r["gbs"] is None for r in pipe)
    topk = [r for r in rows if r["op"] == "topk_ef" and r["backend"] == "auto"]
    assert {(r["n"], r["dtype"]) for r in topk} == {(1000, "fp32"), (1000, "bf16"), (4097, "fp32"), (4097, "bf16")}
    assert all(r["speedup_vs_composite"] > 0 for r in topk)
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows)
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_gbs_arithmetic(monkeypatch):
    """GB/s = the op's minimal traffic / median time, and the fraction divides by the larger of
    the same size's copy and add bandwidth, each computed from their own bytes."""
    n, p = 1000, Params()
    assert traffic_bytes("topk_ef", n, torch.float32, p) == 3 * 4 * n + 10 * (4 + 4)
    assert traffic_bytes("topk_ef", n, torch.bfloat16, p) == 3 * 2 * n + 10 * (2 + 4)
    assert traffic_bytes("sign_decode", n, torch.float32, p) == 125 + 4 + 4 * n
    assert traffic_bytes("sign_accumulate_many", n, torch.float32, p) == 10 * (125 + 4) + 8 * n
    assert traffic_bytes("qsgd", n, torch.float32, p) == 12 * n + (n * 4 + 7) // 8 + 4 * 2  # 4 bits for L = 4
    assert traffic_bytes("pipeline_topk", n, torch.float32, p) is None

    samples = iter([[2.0, 4.0, 3.0], [6.0], [3.0]])  # the op, then copy and add
    monkeypatch.setattr(H, "time_call", lambda *a, **k: next(samples))
    roof = {"copy_gbs": 8 * n / 6.0 / 1e6, "add_gbs": 12 * n / 3.0 / 1e6}
    row = H.measure(CASES["topk_ef"], "reference", n, "fp32", torch.device("cpu"), p, repeat=3, warmup=0,
                    fresh=False, roof=roof, nominal_gbs=None)  # fmt: skip
    assert (row.median_ms, row.min_ms, row.max_ms) == (3.0, 2.0, 4.0)
    assert row.gbs == pytest.approx(12080 / 3.0 / 1e6)
    assert row.bandwidth_gbs == pytest.approx(4e-3) and row.fraction_of_measured == pytest.approx(row.gbs / 4e-3)
    assert row.elements_per_s == pytest.approx(n / 3.0 * 1e3) and row.fraction_of_nominal is None
    bw = H.bandwidth(n, torch.device("cpu"), 1)
    assert bw["copy_gbs"] == pytest.approx(8 * n / 6.0 / 1e6) and bw["add_gbs"] == pytest.approx(12 * n / 3.0 / 1e6)


@pytest.mark.parametrize("name", [c for c in CASES if CASES[c].schema is not None])
def test_every_case_runs_on_each_backend_and_auto_equals_the_reference(name):
    """The cases call the ops correctly: auto (the C++ kernels here) gives the reference's bits
    on fresh inputs, and the composite (where there is one) runs."""
    case = CASES[name]
    p = Params(rows=3)
    outs = {}
    for backend in ("reference", "auto"):
        inputs = case.make(1001, torch.float32, torch.device("cpu"), p)
        result = case.call(backend, inputs)()
        outs[backend] = (result, {k: v for k, v in inputs.tensors.items() if isinstance(v, torch.Tensor)})
    (ref, ref_t), (got, got_t) = outs["reference"], outs["auto"]
    flat = lambda r: [t for t in (r if isinstance(r, (tuple, list)) else [r]) if isinstance(t, torch.Tensor)]  # noqa: E731
    for a, b in zip(flat(got), flat(ref)):
        assert torch.equal(a.to(b.dtype), b), name
    for key in ref_t:
        assert torch.equal(got_t[key], ref_t[key]), (name, key)
    if case.composite:
        case.call("composite", case.make(1001, torch.float32, torch.device("cpu"), p))()


def test_fresh_inputs_restore_what_the_op_writes():
    case = CASES["topk_ef"]
    inputs = case.make(500, torch.float32, torch.device("cpu"), Params())
    before = inputs.tensors["r"].clone()
    fn = case.call("auto", inputs)
    fn()
    assert not torch.equal(inputs.tensors["r"], before)
    inputs.refresh()
    assert torch.equal(inputs.tensors["r"], before)
    calls = []
    H.time_call(lambda: calls.append(inputs.tensors["r"].clone()) or fn(), 3, 0, before=inputs.refresh)
    assert all(torch.equal(c, before) for c in calls)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "unknown op 'nope'; available: topk_ef,"),
        (
            ["topk_ef", "--backends", "gpu"],
            "unknown backend 'gpu'; available: auto, reference, cpu, triton, cuda, composite",
        ),
        (["topk_ef", "--dtypes", "fp8"], "unknown dtype 'fp8'; available: fp32, fp16, bf16"),
        (["topk_ef", "--sizes", "1e4,big"], "--sizes takes numbers such as 1e4,1e6; got 'big'"),
        (["topk_ef", "--sizes", "0"], "--sizes must be whole numbers >= 1"),
        (["topk_ef", "--ratio", "2"], "--ratio must be in (0, 1]"),
        (["topk_ef", "--repeat", "0"], "--repeat must be >= 1"),
        (["topk_ef", "--device", "tpu"], "--device must be cpu or cuda[:N]"),
        (["topk_ef", "--backends", "cuda"], "backend cuda serves CUDA tensors only"),
        (["pipeline_topk", "--plot", "x.png"], "--plot draws GB/s, which the pipelines do not have"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert bench.main([*TINY, *argv]) == 2  # argv last: its values win
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedcomp-bench: error: ") and message in err, err


def test_backends_that_cannot_serve_the_device(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert bench.main(["topk_ef", "--sizes", "100", "--backends", "triton", *TINY]) == 2
    assert "set TRITON_INTERPRET=1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["topk_ef", "--sizes", "100", "--device", "cuda", *TINY]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_console_script_and_module_entry():
    proc = subprocess.run(
        [sys.executable, "-m", "fedcomp.bench", "sign_ef", "--sizes", "64", *TINY],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| sign_ef " in proc.stdout
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedcomp-bench"] == "fedcomp.bench.cli:main"
