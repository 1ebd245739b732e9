"""Row-wise top-m selection: `saev.nn.sparse.largest` against torch.topk, by row length and m.

Every top-k family selects the k + 1 largest pre-activations of each token's row (`top_sets`
asks for one more to see ties at the boundary). On the CPU torch.topk partial-sorts a row while
m * 64 <= n and otherwise selects with nth_element and sorts, 2-3x slower; `largest` runs a
block-max prefilter where it measured faster (`sparse._prefilter_block`, docs/benchmarks.md).
This prints both times per (n, m), the block size the rule picks, and each fixed block size.

    python benchmarks/topk.py                                   # the grid of docs/benchmarks.md
    python benchmarks/topk.py --n 512 2048 --m 7 9 33 --dtype bfloat16
"""

import argparse

import torch
from sae_step import timed  # benchmarks/ is on sys.path when a script in it runs

from saev.nn import sparse

CPU = torch.device("cpu")


def median_ms(fn, iters: int) -> float:
    return timed(fn, iters, CPU) * 1e3


def with_block(size: int | None, values: torch.Tensor, m: int, iters: int) -> float:
    """`largest` with its prefilter forced to `size` entries per block (None: torch.topk)."""
    rule = sparse._prefilter_block
    sparse._prefilter_block = lambda n, m_: size
    try:
        return median_ms(lambda: sparse.largest(values, m), iters)
    finally:
        sparse._prefilter_block = rule


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[512, 1024, 2048, 3072, 6144],
        help="row lengths (d_sae)",
    )
    p.add_argument(
        "--m", type=int, nargs="+", default=[7, 9, 17, 33, 65, 129], help="entries selected per row"
    )
    p.add_argument("--rows", type=int, default=4096, help="rows (tokens of a batch)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="row dtype (bfloat16 rows are made positive: its prefilter needs positive thresholds)",
    )
    p.add_argument("--iters", type=int, default=9, help="timed calls per figure (median)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(
        f"rows={args.rows} dtype={args.dtype} threads={torch.get_num_threads()}; ms, median of {args.iters}"
    )
    print(
        f"{'n':>6} {'m':>5} {'torch.topk':>10} {'largest':>8} {'rule':>5} {'ratio':>6}   fixed blocks"
    )
    for n in args.n:
        values = torch.randn(args.rows, n)
        if args.dtype == "bfloat16":  # the bfloat16 prefilter needs positive thresholds
            values = (values.abs() + 0.01).bfloat16()
        for m in args.m:
            if m * 2 > n:
                continue
            plain = with_block(None, values, m, args.iters)
            ours = median_ms(lambda v=values, k=m: sparse.largest(v, k), args.iters)
            fixed = [
                f"{size}: {with_block(size, values, m, args.iters):.1f}"
                for size in (8, 16, 32)
                if n % size == 0 and m * size * 2 <= n
            ]
            rule = sparse._prefilter_block(n, m)
            print(
                f"{n:>6} {m:>5} {plain:>10.1f} {ours:>8.1f} {rule or '-':>5} {ours / plain:>6.2f}   {', '.join(fixed)}",
                flush=True,
            )
    print("ratio: largest / torch.topk (< 1: the rule's choice is faster).")


if __name__ == "__main__":
    main()
