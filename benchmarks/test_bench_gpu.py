"""GPU benchmarks: every op on CUDA tensors for each GPU backend against the torch composite,
timed with ``triton.testing.do_bench`` (CUDA events, median ms). Skipped without a GPU.

On a GPU machine: ``pytest benchmarks/test_bench_gpu.py --benchmark-only -s``. The Triton
kernels are called directly; the CUDA kernels through ``torch.ops.fedcomp_cuda`` (built on
first use by :func:`fedcomp.build.load_cuda_extension`, which needs a CUDA build of torch).
"""

from __future__ import annotations

import pytest
import torch

from fedcomp import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

N = 10**7


def _providers(op: str, x, r):
    import triton.testing  # noqa: F401  (only on GPU machines)

    from fedcomp import triton as T

    k = N // 100
    packed, scales = T.sign_ef_triton(x, r.clone(), 4096, False)
    codes, norms = T.qsgd_triton(x, None, 4, 512, 0)
    stack = torch.randint(0, 256, (10, (N + 7) // 8), dtype=torch.uint8, device="cuda")
    idx = torch.randperm(N, device="cuda")[:k]
    vals = torch.randn(k, device="cuda")
    out = torch.zeros(N, device="cuda")
    table = {
        "topk_ef": {
            "triton": lambda: T.topk_ef_triton(x, r, k, torch.int64),
            "composite": lambda: bench.composite_topk_ef(x, r, k),
        },
        "sign_ef": {
            "triton": lambda: T.sign_ef_triton(x, r, 4096, False),
            "composite": lambda: bench.composite_sign_ef(x, r),
        },
        "qsgd": {
            "triton": lambda: T.qsgd_triton(x, r, 4, 512, 0),
            "composite": lambda: bench.composite_qsgd(x, r, 4, 512),
        },
        "topk_threshold_ef": {
            "triton": lambda: T.topk_threshold_ef_triton(x, r, k, 2 * k, 65536, 0),
            "composite": lambda: bench.composite_topk_ef(x, r, k),
        },
        "sign_decode": {"triton": lambda: T.sign_decode_triton(packed, scales, N, 4096)},
        "sign_majority (10 rows)": {"triton": lambda: T.sign_majority_triton(stack)},
        "qsgd_decode": {"triton": lambda: T.qsgd_decode_triton(codes, norms, N, 4, 512)},
        "sparse_accumulate": {
            "triton": lambda: T.sparse_accumulate_triton(out, idx, vals, 1.0),
            "composite": lambda: out.index_add_(0, idx, vals),
        },
    }
    try:
        from fedcomp import build

        build.load_cuda_extension()
        ext = torch.ops.fedcomp_cuda
        table["topk_ef"]["cuda"] = lambda: ext.topk_ef(x, r, k)
        table["sign_ef"]["cuda"] = lambda: ext.sign_ef(x, r, 4096, False)
        table["sign_decode"]["cuda"] = lambda: ext.sign_decode(packed, scales, N, 4096)
        table["sparse_accumulate"]["cuda"] = lambda: ext.sparse_accumulate(out, idx, vals, 1.0)
    except Exception as exc:  # CPU-only torch build, no toolkit: report, keep the Triton rows
        print(f"CUDA extension unavailable: {exc}")
    return table[op]


@pytest.mark.parametrize(
    "op",
    [
        "topk_ef",
        "topk_threshold_ef",
        "sign_ef",
        "qsgd",
        "sign_decode",
        "sign_majority (10 rows)",
        "qsgd_decode",
        "sparse_accumulate",
    ],
)
def test_gpu_op(table, op):
    import triton.testing

    x = torch.randn(N, device="cuda")
    r = torch.randn(N, device="cuda") * 0.1
    times = {name: triton.testing.do_bench(fn) for name, fn in _providers(op, x, r).items()}
    add = triton.testing.do_bench(lambda: r.add_(x))
    for name, ms in times.items():
        comp = times.get("composite")
        table(
            "fedcomp GPU ratio table (median ms, n = 10^7)",
            ["op", "provider", "median ms", "speed-up vs composite", "time / in-place add"],
            [op, name, ms, f"{comp / ms:.1f}x" if comp else "", f"{ms / add:.1f}x"],
        )
