"""Shuffled loader throughput vs plain sequential reads of the same shard files (DESIGN §8).

Writes synthetic shards (or uses --shard-root), then measures, on the same files and in the
same run:
- sequential: each shard file read front to back in large `readinto` calls, the chosen
  layer's patch tokens viewed as float32 (the bandwidth ceiling);
- loader: `ShuffledLoader` batches of patch tokens over all images (eval_frac 0, so it
  delivers the same tokens), and again over a 90% train split.
Both are measured warm (files in the page cache, after one untimed read), so the ratio
measures the loader's overhead rather than the disk. Target: loader/sequential >= 0.8.

    python benchmarks/loader.py                      # small synthetic default, ~1 minute on 2 cores
    python benchmarks/loader.py --shard-root SHARDS --layer -2 --batch-size 16384
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np

from saev.shards import Metadata, Shards, ShardWriter
from saev.shards.shuffled import ShuffledLoader, split_images


def synthetic(root: pathlib.Path, n_imgs: int, d: int, n_layers: int) -> Shards:
    md = Metadata(
        vit_family="timm",
        vit_ckpt="synthetic",
        layers=list(range(12 - n_layers, 12)),
        n_blocks=12,
        n_patches_per_img=196,
        cls_token=True,
        d_vit=d,
        n_imgs=n_imgs,
        n_imgs_per_shard=max(1, n_imgs // 4),
        data={"kind": "synthetic"},
    )
    rng = np.random.default_rng(0)
    with ShardWriter(root, md) as w:
        for i in range(0, n_imgs, 32):
            n = min(32, n_imgs - i)
            w.write(rng.standard_normal((n, n_layers, 197, d), dtype=np.float32))
    return Shards(root)


def sequential(shards: Shards, layer_pos: int) -> tuple[int, float]:
    md = shards.md
    t0 = time.perf_counter()
    n = 0
    buf = np.empty(64 * 2**20, dtype=np.uint8)
    per_img = md.bytes_per_img
    for i in range(md.n_shards):
        imgs_per_read = max(1, buf.size // per_img)
        with open(shards.root / md.shard_file(i), "rb", buffering=0) as fd:
            left = md.n_imgs_in(i)
            while left:
                k = min(imgs_per_read, left)
                view = memoryview(buf)[: k * per_img]
                fd.readinto(view)
                acts = buf[: k * per_img].view(md.np_dtype).reshape(k, *md.img_shape)
                patches = acts[:, layer_pos, int(md.cls_token) :].astype(np.float32, copy=False)
                n += patches.shape[0] * patches.shape[1]
                left -= k
    return n, time.perf_counter() - t0


def loader_rate(shards: Shards, layer: int, batch: int, imgs, threads: int) -> tuple[int, float]:
    loader = ShuffledLoader(
        shards, layer=layer, tokens="patches", batch_size=batch, imgs=imgs, n_threads=threads
    )
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x in loader.batches(n_epochs=1))
    return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-root", type=pathlib.Path, default=None)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--n-imgs", type=int, default=1024)
    parser.add_argument("--d-vit", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.shard_root is None:
            shards = synthetic(pathlib.Path(tmp) / "s", args.n_imgs, args.d_vit, args.n_layers)
        else:
            shards = Shards(args.shard_root)
        md = shards.md
        pos = shards.layer_pos(args.layer)
        size = sum((shards.root / md.shard_file(i)).stat().st_size for i in range(md.n_shards))
        print(f"shards: {shards!r}, {size / 2**20:.0f} MiB; cpus: {os.cpu_count()}")
        sequential(shards, pos)  # warm the page cache
        train, _ = split_images(md.n_imgs, 0.1, 0)
        best = {"sequential": 0.0, "loader": 0.0, "loader (90% split)": 0.0}
        for _ in range(args.repeats):
            for name, fn in (
                ("sequential", lambda: sequential(shards, pos)),
                (
                    "loader",
                    lambda: loader_rate(shards, args.layer, args.batch_size, None, args.threads),
                ),
                (
                    "loader (90% split)",
                    lambda: loader_rate(shards, args.layer, args.batch_size, train, args.threads),
                ),
            ):
                n, s = fn()
                best[name] = max(best[name], n / s)
        for name, rate in best.items():
            print(
                f"{name:>20}: {rate:,.0f} patches/s ({rate * md.d_vit * 4 / 2**20:,.0f} MiB/s float32)"
            )
        print(f"ratio loader/sequential: {best['loader'] / best['sequential']:.2f} (target >= 0.8)")
        print(
            f"ratio loader (90% split)/sequential: {best['loader (90% split)'] / best['sequential']:.2f}"
        )


if __name__ == "__main__":
    main()
