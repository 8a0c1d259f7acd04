"""Every Triton kernel compiled ahead of time, and every .cu file through nvcc, for sm_80 and
sm_90, without a GPU. These run in subprocesses: the rest of the suite uses Triton's
interpreter (TRITON_INTERPRET=1), which ahead-of-time compilation must not see."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fedcomp import gpu_compile

CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SNIPPET = (
    "import json, dataclasses\n"
    "from fedcomp import gpu_compile\n"
    "rows = gpu_compile.compile_{kind}()\n"
    "print(json.dumps([dataclasses.asdict(r) for r in rows]))\n"
)


def _rows(kind: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET.format(kind=kind)], capture_output=True, text=True, env=CLEAN_ENV, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_launch_configuration_compiles_for_sm80_and_sm90():
    from fedcomp.triton import HOT_KERNELS, LAUNCH_CONFIGS

    rows = _rows("triton")
    assert {(r["kernel"], r["target"]) for r in rows} == {
        (c[0], f"sm_{a}") for c in LAUNCH_CONFIGS for a in gpu_compile.ARCHS
    }
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad[:3]
    if gpu_compile.find_cuobjdump() is None:
        pytest.skip("no cuobjdump to read registers and spills from the cubins")
    hot = [r for r in rows if r["kernel"].startswith(HOT_KERNELS)]
    assert hot and all(r["spills"] == 0 for r in hot), [r for r in hot if r["spills"]]
    assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.skipif(gpu_compile.find_nvcc() is None, reason="nvcc is not on this machine")
def test_cuda_file_compiles_with_nvcc_for_sm80_and_sm90():
    rows = _rows("cuda")
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad
    for arch in gpu_compile.ARCHS:
        names = {r["kernel"] for r in rows if r["target"] == f"sm_{arch}"}
        for kernel in (
            "topk_keys_kernel",
            "histogram_kernel<11>",
            "compact_kernel",
            "block_stat_kernel",
            "sign_codes_kernel",
            "sign_decode_kernel<false>",
            "sign_decode_kernel<true>",
            "sparse_accumulate_kernel",
        ):
            assert kernel in names, (arch, kernel, names)
    assert all(r["spills"] == 0 and r["registers"] > 0 for r in rows)


@pytest.mark.skipif(gpu_compile.find_nvcc() is None, reason="nvcc is not on this machine")
def test_a_broken_cuda_file_is_reported(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { undefined_symbol(); }\n")
    rows = gpu_compile.compile_cuda(archs=(80,), source=bad)
    assert rows[0].status.startswith("nvcc failed") and "undefined_symbol" in rows[0].status


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or gpu_compile.find_nvcc() is None, reason="needs triton and nvcc"
)
def test_env_compile_gpu_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "fedcomp.env", "--compile-gpu"],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| kind   | kernel" in out.stdout and "registers" in out.stdout and "spill" in out.stdout
    assert "| triton | topk_keys[has_r=1,rows=1]" in out.stdout and "| cuda   | compact_kernel" in out.stdout
    assert " of " in out.stdout.splitlines()[-1] or "compiled" in out.stdout
