"""``python -m fedcomp.demo``: compress a gradient-sized vector with every op and time it.

1. Compresses a synthetic 10^6-entry update with top-k 1 % + error feedback,
   sign + EF, and QSGD, and prints the wire size of each and the error-feedback
   invariant.
2. Checks every op against the pure-PyTorch reference on odd sizes.
3. Times the fused kernels against the torch composite of the same op and
   against one in-place add of the same length, and prints the ratio table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import _backend, bench, ops, reference


def _wire_sizes(n: int) -> list[list[object]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    dense = 4 * n
    rows = []

    residual = torch.zeros(n)
    values, indices = ops.topk_ef(x, residual, n // 100, index_dtype=torch.int32)
    decoded = torch.zeros(n).index_put_((indices.long(),), values)
    exact = torch.equal(decoded + residual, x)
    nbytes = values.numel() * 4 + indices.numel() * 4
    rows.append(["top-k 1% + EF", nbytes, dense / nbytes, "exact" if exact else "VIOLATED"])

    residual = torch.zeros(n)
    packed, scales = ops.sign_ef(x, residual, block=4096)
    err = (ops.sign_decode(packed, scales, n, 4096) + residual - x).abs().max().item()
    nbytes = packed.numel() + scales.numel() * 4
    rows.append(["sign (block 4096) + EF", nbytes, dense / nbytes, f"max err {err:.1e}"])

    residual = torch.zeros(n)
    packed, norms = ops.qsgd(x, residual, levels=4, bucket=512, seed=1)
    err = (ops.qsgd_decode(packed, norms, n, 4, 512) + residual - x).abs().max().item()
    nbytes = packed.numel() + norms.numel() * 4
    rows.append(["QSGD 4 levels (bucket 512) + EF", nbytes, dense / nbytes, f"max err {err:.1e}"])
    return rows


def _agreement() -> list[list[object]]:
    rows = []
    for n in (1, 7, 1023, 70001):
        x = torch.randn(n)
        r = torch.randn(n)
        r1, r2 = r.clone(), r.clone()
        same_topk = all(
            torch.equal(a, b)
            for a, b in zip(ops.topk_ef(x, r1, max(1, n // 10)), reference.topk_ef(x, r2, max(1, n // 10)))
        )
        same_topk &= torch.equal(r1, r2)
        p1, _ = ops.sign_ef(x, r.clone(), 64)
        p2, _ = reference.sign_ef(x, r.clone(), 64, False)
        rows.append([n, "identical" if same_topk else "DIFFERENT", "identical" if torch.equal(p1, p2) else "DIFFERENT"])
    return rows


def speed_table(n: int, repeat: int) -> list[list[object]]:
    """Rows: op, fused ms, composite ms, composite/fused, fused/add: fedcomp-bench's cases and
    timing (``fedcomp-bench topk_ef,sign_ef,qsgd --sizes N`` gives the same with GB/s)."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(n, generator=g), torch.randn(n, generator=g)
    add_ms = bench.median_ms(lambda: bench.composite_add(x, r), repeat)
    rows = [["in-place add (yardstick)", add_ms, "", "", 1.0]]
    params, cpu = bench.Params(), torch.device("cpu")
    for name in ("topk_ef", "sign_ef", "qsgd"):
        case = bench.CASES[name]
        f_ms = bench.median_ms(case.call("auto", case.make(n, torch.float32, cpu, params)), repeat)
        c_ms = bench.median_ms(case.call("composite", case.make(n, torch.float32, cpu, params)), max(2, repeat // 2))
        rows.append([f"{name} ({case.doc})", f_ms, c_ms, c_ms / f_ms, f_ms / add_ms])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcomp.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10**7, help="length of the timed vectors (default 10^7)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per op (median reported)")
    args = parser.parse_args(argv)
    if args.n < 100:
        parser.error(f"--n must be >= 100; got {args.n}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1; got {args.repeat}")

    print(
        f"fedcomp demo: CPU backend = {_backend.cpu_backend()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("1. Compressing a 10^6-entry fp32 update (dense: 4,000,000 bytes)\n")
    print(
        bench.format_table(
            ["compressor", "payload bytes", "ratio", "decode + residual == x + residual_before"], _wire_sizes(10**6)
        )
    )
    print("\n2. Fused kernels against the reference (bit-for-bit)\n")
    print(bench.format_table(["n", "topk_ef", "sign_ef packed bits"], _agreement()))
    print(f"\n3. Speed at n = {args.n:,} (median of {args.repeat}; ms)\n")
    print(bench.format_table(["op", "fused", "torch composite", "speed-up", "x add"], speed_table(args.n, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
