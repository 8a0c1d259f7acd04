"""Argument checking, opcheck, torch.compile, backend choice, build and env tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fedcomp
from fedcomp import _backend, build

x8 = torch.randn(8)
r8 = torch.zeros(8)
packed1 = torch.zeros(1, dtype=torch.uint8)
scales1 = torch.ones(1)


# (call, exception type, text the message must contain)
BAD_INPUT = [
    (lambda: fedcomp.topk_ef(x8, r8, 9), ValueError, "k must be in [0, 8]"),
    (lambda: fedcomp.topk_ef(x8, r8, -1), ValueError, "k must be in [0, 8]"),
    (lambda: fedcomp.topk_ef(x8, r8, 2.0), TypeError, "k must be an int"),
    (lambda: fedcomp.topk_ef(x8, r8, True), TypeError, "k must be an int"),
    (lambda: fedcomp.topk_ef(torch.arange(8), None, 2), TypeError, "x must have dtype"),
    (lambda: fedcomp.topk_ef(x8.double(), None, 2), TypeError, "x must have dtype"),
    (lambda: fedcomp.topk_ef(x8.tolist(), None, 2), TypeError, "x must be a torch.Tensor"),
    (lambda: fedcomp.topk_ef(torch.randn(2, 2, 2), None, 2), ValueError, "x must be 1-D"),
    (lambda: fedcomp.topk_ef(torch.randn(16)[::2], None, 2), ValueError, "x must be contiguous"),
    (lambda: fedcomp.topk_ef(x8, torch.zeros(7), 2), ValueError, "residual must have the shape of x"),
    (lambda: fedcomp.topk_ef(x8, r8.half(), 2), TypeError, "residual must have the dtype of x"),
    (lambda: fedcomp.topk_ef(x8, torch.zeros(8, device="meta"), 2), ValueError, "residual must be on the device"),
    (lambda: fedcomp.topk_ef(x8, torch.zeros(16)[::2], 2), ValueError, "residual must be contiguous"),
    (lambda: fedcomp.topk_ef(x8, x8, 2), ValueError, "residual must not share memory with x"),
    (lambda: fedcomp.topk_ef(x8, [0.0] * 8, 2), TypeError, "residual must be a torch.Tensor"),
    (lambda: fedcomp.topk_ef(x8, r8, 2, index_dtype=torch.int16), TypeError, "index_dtype must be"),
    (lambda: fedcomp.topk_threshold_ef(x8, r8, 3, capacity=9), ValueError, "capacity must be in [0, 8]"),
    (lambda: fedcomp.topk_threshold_ef(x8, r8, 3, sample_size=0), ValueError, "sample_size must be >= 1"),
    (lambda: fedcomp.topk_threshold_ef(x8, r8, 3, seed=-1), ValueError, "seed must be in"),
    (lambda: fedcomp.sign_ef(x8, r8, 0), ValueError, "block must be >= 1"),
    (lambda: fedcomp.sign_ef(x8, r8, -4), ValueError, "block must be >= 1"),
    (lambda: fedcomp.sign_ef(x8, r8, 4, scale="max"), ValueError, "scale must be 'mean' or 'l2'"),
    (
        lambda: fedcomp.sign_decode(torch.zeros(2, dtype=torch.uint8), scales1, 8),
        ValueError,
        "packed must hold 1 bytes",
    ),
    (lambda: fedcomp.sign_decode(packed1, torch.ones(2), 8, None), ValueError, "scales must hold 1 entries"),
    (lambda: fedcomp.sign_decode(packed1.long(), scales1, 8), TypeError, "packed must have dtype uint8"),
    (lambda: fedcomp.sign_decode(packed1, scales1, -1), ValueError, "numel must be >= 0"),
    (lambda: fedcomp.sign_majority(torch.zeros(0, 3, dtype=torch.uint8)), ValueError, "at least one row"),
    (lambda: fedcomp.sign_majority(packed1), ValueError, "packed_stack must be 2-D"),
    (lambda: fedcomp.qsgd(x8, r8, 0), ValueError, "levels must be in [1, 32768]"),
    (lambda: fedcomp.qsgd(x8, r8, 4, 0), ValueError, "bucket must be >= 1"),
    (lambda: fedcomp.qsgd(x8, r8, 4, 4, seed=1, generator=torch.Generator()), ValueError, "not both"),
    (
        lambda: fedcomp.qsgd_decode(torch.zeros(5, dtype=torch.uint8), scales1, 8, 4, None),
        ValueError,
        "packed must hold 4 bytes",
    ),
    (
        lambda: fedcomp.sparse_accumulate(x8.half(), torch.tensor([0]), torch.ones(1)),
        TypeError,
        "out must have dtype float32",
    ),
    (lambda: fedcomp.sparse_accumulate(x8, torch.tensor([0.0]), torch.ones(1)), TypeError, "indices must have dtype"),
    (lambda: fedcomp.sparse_accumulate(x8, torch.tensor([0, 1]), torch.ones(1)), ValueError, "same length"),
    (
        lambda: fedcomp.sparse_accumulate(x8, torch.tensor([0]), torch.ones(1), float("nan")),
        ValueError,
        "alpha must be finite",
    ),
    (lambda: fedcomp.sparse_accumulate(x8, torch.tensor([0]), torch.ones(1), "1"), TypeError, "alpha must be a float"),
]


@pytest.mark.parametrize("call, exc, text", BAD_INPUT, ids=[t for _, _, t in BAD_INPUT])
def test_bad_input_names_the_argument(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_bad_input_leaves_residual_untouched():
    r = torch.arange(8.0)
    with pytest.raises(ValueError):
        fedcomp.topk_ef(x8, r, 100)
    assert torch.equal(r, torch.arange(8.0))


def _opcheck_samples():
    x = torch.randn(1000)
    return [
        ("topk_ef", (x, torch.randn(1000), 10, torch.int64)),
        ("topk_ef", (x, None, 10, torch.int32)),
        ("topk_threshold_ef", (x, torch.randn(1000), 10, 20, 256, 1)),
        ("sign_ef", (x, torch.randn(1000), 64, False)),
        ("sign_ef", (x.half(), None, 1000, True)),
        ("sign_decode", (torch.randint(0, 255, (125,), dtype=torch.uint8), torch.rand(16), 1000, 64)),
        ("sign_majority", (torch.randint(0, 255, (3, 125), dtype=torch.uint8),)),
        ("qsgd", (x, torch.randn(1000), 4, 128, 5)),
        ("qsgd_decode", (torch.randint(0, 255, (500,), dtype=torch.uint8), torch.rand(8), 1000, 4, 128)),
        ("sparse_accumulate", (torch.zeros(1000), torch.randint(0, 1000, (50,)), torch.randn(50), 0.5)),
        (
            "sign_accumulate",
            (torch.randn(1000), torch.randint(0, 255, (125,), dtype=torch.uint8), torch.rand(16), 64, 0.3),
        ),
        (
            "qsgd_accumulate",
            (torch.randn(1000), torch.randint(0, 255, (500,), dtype=torch.uint8), torch.rand(8), 4, 128, 0.3),
        ),
        (
            "sign_accumulate_many",
            (
                torch.randn(1000),
                [torch.randint(0, 255, (125,), dtype=torch.uint8)] * 2,
                [torch.rand(16)] * 2,
                64,
                [0.3, -1.0],
            ),
        ),  # fmt: skip
        (
            "qsgd_accumulate_many",
            (
                torch.randn(1000),
                [torch.randint(0, 255, (500,), dtype=torch.uint8)] * 3,
                [torch.rand(8)] * 3,
                4,
                128,
                [0.3, 0.5, 2.0],
            ),
        ),  # fmt: skip
        ("randk_positions", (torch.tensor([1, 2, 3, 4]), 10, 1000)),
        ("randk_ef_rows", (x.view(2, 500), torch.randn(2, 500), [1, 5], 10)),
    ]


@pytest.mark.parametrize("name, args", _opcheck_samples(), ids=[n for n, _ in _opcheck_samples()])
def test_opcheck(backend, name, args):
    torch.library.opcheck(getattr(torch.ops.fedcomp, name).default, args)


def test_ops_trace_under_torch_compile(backend):
    def step(x, r):
        values, indices = fedcomp.topk_ef(x, r, 16)
        out = torch.zeros_like(x)
        fedcomp.sparse_accumulate(out, indices, values, 1.0)
        return out

    x, r1 = torch.randn(1024), torch.randn(1024)
    r2 = r1.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x, r1), step(x, r2), rtol=0, atol=0)
    assert torch.equal(r1, r2)


def test_fake_kernels_give_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1001)
        packed, scales = torch.ops.fedcomp.sign_ef(x, None, 100, False)
        codes, norms = torch.ops.fedcomp.qsgd(x, None, 4, 100, 0)
    assert packed.shape == (126,) and scales.shape == (11,)
    assert codes.shape == ((1001 * 4 + 7) // 8,) and norms.shape == (11,)


# --------------------------------------------------------------------------
# backend choice, build and environment report (fresh interpreters)
# --------------------------------------------------------------------------
def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)


SNIPPET = (
    "import torch, fedcomp\n"
    "from fedcomp import _backend\n"
    "x = torch.arange(10.0) - 4.5\n"
    "v, i = fedcomp.topk_ef(x, None, 3)\n"
    "print(_backend.cpu_backend(), i.tolist())\n"
)


def test_forced_reference_backend_serves_and_agrees():
    out = _run(SNIPPET, FEDCOMP_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "[0,", "1,", "9]"]


def test_unknown_backend_name_lists_the_choices():
    out = _run(SNIPPET, FEDCOMP_BACKEND="fastest")
    assert out.returncode != 0
    assert "FEDCOMP_BACKEND must be one of auto, reference, cpu, triton, cuda" in out.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FEDCOMP_BACKEND": "triton", "TRITON_INTERPRET": "0"}, "needs Triton's interpreter: set TRITON_INTERPRET=1"),
        ({"FEDCOMP_BACKEND": "cuda"}, "FEDCOMP_BACKEND=cuda serves CUDA tensors only"),
    ],
)
def test_forcing_a_gpu_backend_on_cpu_tensors_raises(env, message):
    out = _run(SNIPPET, **env)
    assert out.returncode != 0 and "BackendUnavailable" in out.stderr and message in out.stderr


def test_forced_triton_backend_serves_cpu_tensors_under_the_interpreter():
    pytest.importorskip("triton")
    out = _run(SNIPPET, FEDCOMP_BACKEND="triton", TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["triton", "[0,", "1,", "9]"]


def test_failed_build_forced_cpu_raises_and_auto_falls_back_with_one_warning(tmp_path):
    broken = {"FEDCOMP_CACHE": str(tmp_path), "CXX": "/bin/false"}
    forced = _run(SNIPPET, FEDCOMP_BACKEND="cpu", **broken)
    assert forced.returncode != 0
    assert "BackendUnavailable: FEDCOMP_BACKEND=cpu but the C++ CPU kernels could not be built" in forced.stderr
    auto = _run(
        "import warnings; warnings.simplefilter('always')\n" + SNIPPET + SNIPPET.split("\n", 3)[3],
        FEDCOMP_BACKEND="auto",
        **broken,
    )
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.split()[:4] == ["reference", "[0,", "1,", "9]"]
    assert auto.stderr.count("C++ CPU kernels unavailable") == 1


def test_import_does_not_build(tmp_path):
    out = _run("import fedcomp, fedcomp.build as b; print(b.is_built())", FEDCOMP_CACHE=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "False"
    assert list(tmp_path.iterdir()) == []


def test_build_cache_is_keyed_by_torch_and_sources():
    name = build.build_dir().name
    assert torch.__version__.replace("+", "_") in name and build.build_tag() in name
    assert build.library_name().endswith(build.build_tag())


def test_a_built_library_is_loaded_without_a_rebuild_check(backend, monkeypatch):
    """Once built, the kernels load directly: cpp_extension's ninja check would rebuild them
    (30 s) for every checkout whose sources sit at another path than the last build's."""
    from torch.utils import cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("cpp_extension.load was called for an already built library")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    assert build.is_built()
    assert build.load_cpu_extension() == build.library_path()


def test_env_report_lists_what_was_found(backend):
    out = subprocess.run([sys.executable, "-m", "fedcomp.env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for item in (
        "torch",
        "c++ compiler",
        "ninja",
        "nvcc",
        "triton",
        "CPU kernels built for this torch",
        "CPU tensors use",
    ):
        assert item in out.stdout
    rows = dict(re.match(r"^(.*?)\s{2,}(.*)$", line).groups() for line in out.stdout.splitlines())
    assert rows["CPU tensors use"] == "cpu"


def test_build_cli_reports_success(backend):
    out = subprocess.run([sys.executable, "-m", "fedcomp.build"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "CPU kernels ready" in out.stdout


def test_backend_choice_is_cached():
    assert _backend.cpu_backend() is _backend.cpu_backend()
