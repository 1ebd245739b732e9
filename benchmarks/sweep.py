"""One-pass sweep vs the same members run one by one, as a user runs them (DESIGN §8, issue 11).

For each grid (S members differing in k, or in lr) it times
  one pass:  one `python -m saev train --sweep grid.toml` process (every batch read once, the
             members stacked; with ragged k each member pays for its own k),
  separate:  S `python -m saev train` processes of one member each, on the same shards,
both end to end (process start, shard checks, init sample, training, the final evaluation
of `--n-eval` tokens), and checks that every member's final FVU is the same both ways.
It prints wall times and the ratio one-pass / separate (target <= 0.9 on CPU, <= 1/3 on GPU).

    python benchmarks/sweep.py                          # d 384, 8x, 164k tokens: minutes on 2 CPU cores
    python benchmarks/sweep.py --sizes 4 --grids k      # one row
    python benchmarks/sweep.py --shards DIR --layer -2  # recorded activations instead of synthetic ones
    python benchmarks/sweep.py --dtype bfloat16 --device cuda --n-train 20_000_000 --batch-size 16384
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from saev.shards import Metadata, ShardWriter


def make_shards(root: pathlib.Path, n_imgs: int, d: int, seed: int = 0) -> pathlib.Path:
    """Sparse sums of 4d random directions plus noise, 196 patches + CLS per image."""
    md = Metadata(
        vit_family="timm",
        vit_ckpt="synthetic",
        layers=[10],
        n_blocks=12,
        n_patches_per_img=196,
        cls_token=True,
        d_vit=d,
        n_imgs=n_imgs,
        n_imgs_per_shard=max(1, n_imgs // 2),
        data={"kind": "synthetic"},
    )
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32)
    with ShardWriter(root, md) as w:
        for i in range(0, n_imgs, 16):
            n = min(16, n_imgs - i)
            codes = rng.exponential(size=(n, 1, 197, 4 * d)) * (
                rng.random((n, 1, 197, 4 * d)) < 0.02
            )
            w.write((codes.astype(np.float32) @ atoms).astype(np.float32))
    return root


def grids(kind: str, S: int) -> list[dict]:
    """S members' values for a grid axis: k doubling from 16, or lr halving from 4e-3."""
    if kind == "k":
        ks = [16, 32, 64, 128, 24, 48, 96, 192][:S]
        return [{"sae.k": k} for k in sorted(ks)]
    return [{"lr": 4e-3 / 2**i} for i in range(S)]


def toml(args, members: list[dict]) -> str:
    """A sweep file with the given members (one value: a fixed key; several: a grid axis)."""
    keys = sorted({k for m in members for k in m})
    top, sae = [], ['family = "topk"', f"exp_factor = {args.exp_factor}"]
    for key in keys:
        values = [m[key] for m in members]
        text = repr(values[0]) if len(values) == 1 else repr(values)
        (sae if key.startswith("sae.") else top).append(f"{key.removeprefix('sae.')} = {text}")
    if not any(k == "sae.k" for k in keys):
        sae.append("k = 32")
    return "\n".join(top) + "\n[sae]\n" + "\n".join(sae) + "\n"


def run(
    args, shards: pathlib.Path, grid: pathlib.Path, run_root: pathlib.Path
) -> tuple[float, dict]:
    """Wall seconds of one `saev train` process and {axis values: final eval FVU}."""
    cmd = [
        sys.executable, "-m", "saev", "train",
        "--sweep", str(grid),
        "--data.shard-root", str(shards),
        "--data.layer", str(args.layer),
        "--data.batch-size", str(args.batch_size),
        "--n-train", str(args.n_train),
        "--n-eval", str(args.n_eval),
        "--ckpt-every", "0",
        "--run-root", str(run_root),
        "--device", args.device,
        "--dtype", args.dtype,
    ]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    (run_dir,) = run_root.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    fvus = {}
    for m in summary["members"]:
        cfg = json.loads((pathlib.Path(m["ckpt"]) / "config.json").read_text())
        fvus[(cfg["hparams"]["k"], cfg["lr"])] = m["eval"]["fvu"]
    return seconds, fvus


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8], help="members per sweep")
    parser.add_argument("--grids", nargs="+", default=["k", "lr"], choices=["k", "lr"])
    parser.add_argument("--shards", type=pathlib.Path, help="recorded shards (default: synthetic)")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--n-imgs", type=int, default=900, help="synthetic images (197 tokens)")
    parser.add_argument("--d-vit", type=int, default=384)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=164_000)
    parser.add_argument("--n-eval", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shards = args.shards or make_shards(tmp / "shards", args.n_imgs, args.d_vit)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import saev.train.main"], check=True)
        startup = time.perf_counter() - t0
        print(
            f"topk, d_sae = {args.exp_factor} x d_vit, n_train={args.n_train:,}, batch={args.batch_size}, "
            f"dtype={args.dtype}, device={args.device}, cpus={os.cpu_count()}, "
            f"process start-up {startup:.1f} s"
        )
        print(
            f"{'grid':>5} {'S':>3} {'one pass (s)':>13} {'separate (s)':>13} {'ratio':>6}  max |dFVU|"
        )
        for kind in args.grids:
            for S in args.sizes:
                members = grids(kind, S)
                grid = tmp / f"{kind}{S}.toml"
                grid.write_text(toml(args, members))
                one, fvu_one = run(args, shards, grid, tmp / f"one-{kind}{S}")
                separate, fvu_sep = 0.0, {}
                for i, m in enumerate(members):
                    solo = tmp / f"{kind}{S}-{i}.toml"
                    solo.write_text(toml(args, [m]))
                    seconds, fvus = run(args, shards, solo, tmp / f"sep-{kind}{S}-{i}")
                    separate += seconds
                    fvu_sep.update(fvus)
                diff = max(abs(fvu_one[key] - fvu_sep[key]) for key in fvu_one)
                print(
                    f"{kind:>5} {S:>3} {one:>13.1f} {separate:>13.1f} {one / separate:>6.2f}  {diff:.1e}"
                )
        print(
            "ratio: one pass / separate runs (< 1: the one-pass sweep is cheaper; target <= 0.9 on CPU)."
        )


if __name__ == "__main__":
    main()
