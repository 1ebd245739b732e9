"""One sweep on 2 ranks (torchrun, members split by cost) vs the same sweep in 1 process (issue 14).

Times four runs of one grid on the same shards, each end to end as a user runs it:
  1 process:        `python -m saev train --sweep grid.toml` (torch's default intra-op threads)
  1 process, 1 thr: the same with OMP_NUM_THREADS=1, as each rank below runs
  2 ranks, each:    `torchrun --nproc-per-node 2 -m saev train ... --dist-read each`
                    (every rank reads the same deterministic stream)
  2 ranks, bcast:   the same with `--dist-read broadcast` (rank 0 reads, sends each batch)
and prints wall times, the training throughput (tokens/s of the slowest member at its last
logged step, which leaves out process start, init and the final evaluation), the ratios
2 ranks / 1 process and broadcast / each, and checks that both 2-rank runs wrote the same
checkpoints bit for bit as the 1-thread process, and that every member's FVU matches the
default-thread process.

    python benchmarks/dist.py                       # d 128, 4 top-k + 2 relu members, minutes on 2 cores
    python benchmarks/dist.py --device cuda --nproc 8 --n-train 50_000_000 --batch-size 16384
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sweep import make_shards  # noqa: E402 (the same synthetic shards as the sweep benchmark)

GRID = """
n_train = {n_train}
lr = 2e-3
ckpt_every = 0
log_every = 5
n_init_sample = 16384
n_eval = 20000
[data]
layer = 10
batch_size = {batch_size}
n_threads = 2
[sae]
family = ["topk", "relu"]
exp_factor = {exp_factor}
k = [16, 32, 64, 128]
sparsity_coeff = [1.0, 5.0]
"""


def train(
    args, cmd_prefix: list[str], grid: pathlib.Path, shards, runs, extra=(), env=None
) -> tuple:
    cmd = [*cmd_prefix, "-m", "saev", "train", "--sweep", str(grid), "--device", args.device]
    cmd += ["--data.shard-root", str(shards), "--run-root", str(runs), *extra]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    )
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    (run_dir,) = runs.iterdir()
    members = json.loads((run_dir / "summary.json").read_text())["members"]
    tps = min(
        json.loads(
            (run_dir / "members" / m["name"] / "metrics.jsonl").read_text().splitlines()[-1]
        )["tokens_per_s"]
        for m in members
    )
    return wall, tps, run_dir, {m["name"]: m["eval"]["fvu"] for m in members}, cpu


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished descendant process (ranks included)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--n-imgs", type=int, default=512)
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shards", type=pathlib.Path, help="existing shards (layer 10) instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shards = args.shards or make_shards(tmp / "shards", args.n_imgs, args.d)
        grid = tmp / "grid.toml"
        grid.write_text(
            GRID.format(
                n_train=args.n_train, batch_size=args.batch_size, exp_factor=args.exp_factor
            )
        )
        py = [sys.executable]
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
        run += ["--master-addr", "127.0.0.1", "--master-port", "29531"]
        one = train(args, py, grid, shards, tmp / "one")
        one1 = train(args, py, grid, shards, tmp / "one1", env={"OMP_NUM_THREADS": "1"})
        each = train(args, run, grid, shards, tmp / "each", ["--dist-read", "each"])
        bcast = train(args, run, grid, shards, tmp / "bcast", ["--dist-read", "broadcast"])

        for name in one[3]:
            a = load_file(each[2] / "members" / name / "sae.safetensors")
            b = load_file(bcast[2] / "members" / name / "sae.safetensors")
            c = load_file(one1[2] / "members" / name / "sae.safetensors")
            assert all((a[k] == b[k]).all() and (a[k] == c[k]).all() for k in a), name
            # 1 process uses 2 intra-op threads, a rank 1: equal up to the order of sums.
            assert abs(each[3][name] - one[3][name]) <= 1e-3 * one[3][name], name

    print(
        f"grid: 4 topk (k 16-128) + 2 relu, d {args.d}, d_sae {args.d * args.exp_factor}, "
        f"{args.n_train:,} tokens, batch {args.batch_size}, device {args.device}"
    )
    print(f"{'run':<22}{'wall s':>9}{'CPU s':>9}{'train tok/s':>14}")
    for label, r in [
        ("1 process", one),
        ("1 process, 1 thread", one1),
        (f"{args.nproc} ranks, each reads", each),
        (f"{args.nproc} ranks, broadcast", bcast),
    ]:
        print(f"{label:<22}{r[0]:>9.1f}{r[4]:>9.1f}{r[1]:>14,.0f}")
    print(
        f"train throughput {args.nproc} ranks / 1 process: each {each[1] / one[1]:.2f}, "
        f"broadcast {bcast[1] / one[1]:.2f}; / 1 process of 1 thread: each "
        f"{each[1] / one1[1]:.2f}, broadcast {bcast[1] / one1[1]:.2f}; broadcast / each "
        f"{bcast[1] / each[1]:.2f}"
    )
    print(
        f"wall 1 process / {args.nproc} ranks: each {one[0] / each[0]:.2f}, broadcast "
        f"{one[0] / bcast[0]:.2f}; CPU s {args.nproc} ranks / 1 process: each "
        f"{each[4] / one[4]:.2f}, broadcast {bcast[4] / one[4]:.2f}"
    )
    print("checkpoints of both 2-rank runs and the 1-thread process: equal bit for bit")


if __name__ == "__main__":
    main()
