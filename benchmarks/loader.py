"""Shuffled loader throughput vs a sequential reader of the same shard files (DESIGN §8).

Writes synthetic shards (or uses --shard-root), then measures, on the same files and in the
same run, two readers that do the same work for a training consumer: deliver the chosen
layer's patch tokens as fresh float32 `[batch, d_vit]` tensors.
- sequential: each shard file read front to back with large `readinto` calls into one reused
  buffer, its tokens copied into batches in file order (the bandwidth ceiling: one
  sequential stream, no shuffling);
- loader: `ShuffledLoader` batches over all images (eval_frac 0, so the same tokens), and
  again over a 90% train split.
Both run `--epochs` passes per measurement (steady state: the loader's first window read is
not overlapped with anything), warm (files in the page cache, after one untimed read), so
the ratio measures the loader's overhead rather than the disk. `--buffer-mb` defaults to a
quarter of the data, so several windows stream through the buffer as in a real run where the
shards are much larger than it. Besides wall-clock rates it prints process CPU time per
million tokens, which is less sensitive to other load on a shared machine.
Target: loader/sequential >= 0.8.

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
from saev.shards.shuffled import ShuffledLoader, copy_as_float32, split_images


def synthetic(root: pathlib.Path, n_imgs: int, d: int, n_layers: int, dtype: str) -> Shards:
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
        dtype=dtype,
        data={"kind": "synthetic"},
    )
    rng = np.random.default_rng(0)
    with ShardWriter(root, md) as w:
        for i in range(0, n_imgs, 32):
            n = min(32, n_imgs - i)
            w.write(rng.standard_normal((n, n_layers, 197, d), dtype=np.float32))
    return Shards(root)


def sequential(shards: Shards, layer_pos: int, batch: int, epochs: int, buf: np.ndarray) -> int:
    """File-order float32 batches of the layer's patch tokens, read through `buf` (bytes, at
    least one image); returns the tokens delivered."""
    md = shards.md
    first = int(md.cls_token)
    per_img = md.bytes_per_img
    n = 0
    for _ in range(epochs):
        out, fill = np.empty((batch, md.d_vit), np.float32), 0
        for i in range(md.n_shards):
            with open(shards.root / md.shard_file(i), "rb", buffering=0) as fd:
                left = md.n_imgs_in(i)
                while left:
                    k = min(buf.size // per_img, left)
                    fd.readinto(memoryview(buf)[: k * per_img])
                    acts = buf[: k * per_img].view(md.np_dtype).reshape(k, *md.img_shape)
                    toks = acts[:, layer_pos, first:]  # [k, patches, d]
                    n_tok = toks.shape[1]
                    r = 0
                    while r < k * n_tok:
                        m = min(batch - fill, k * n_tok - r)
                        _copy_rows(out[fill : fill + m], toks, r)
                        fill, r = fill + m, r + m
                        if fill == batch:
                            n, out, fill = n + batch, np.empty((batch, md.d_vit), np.float32), 0
                    left -= k
        n += fill
    return n


def _copy_rows(dst: np.ndarray, toks: np.ndarray, r: int) -> None:
    """dst[j] = token r + j of the image-major token rows of `toks` [imgs, n_tok, d], one
    strided copy per image touched, never row by row. The loader's own conversion routine,
    so both sides pay the same for float16."""
    n_tok, m, j = toks.shape[1], dst.shape[0], 0
    img, t = divmod(r, n_tok)
    while j < m:
        h = min(n_tok - t, m - j)
        copy_as_float32(dst[j : j + h], toks[img, t : t + h])
        j, img, t = j + h, img + 1, 0


def make_loader(shards: Shards, args, imgs) -> ShuffledLoader:
    return ShuffledLoader(
        shards,
        layer=args.layer,
        tokens="patches",
        batch_size=args.batch_size,
        imgs=imgs,
        n_threads=args.threads,
        buffer_mb=args.buffer_mb,
    )


def gather_vs_copy(md, batch: int, window_mb: float) -> tuple[float, float]:
    """Rows/s of the loader's batch step alone (random rows of a window-sized float32 buffer,
    one `np.take` per batch) and of the sequential reader's (contiguous rows): the one cost
    the shuffle adds, without any IO."""
    rows = max(int(window_mb * 2**20) // (4 * md.d_vit), 4 * batch)
    src = np.random.default_rng(0).standard_normal((rows, md.d_vit), dtype=np.float32)
    idx = np.random.default_rng(1).permutation(rows)
    best = [0.0, 0.0]
    for _ in range(3):
        for k, take in enumerate((True, False)):
            t0 = time.perf_counter()
            for a in range(0, rows - batch + 1, batch):
                out = np.empty((batch, md.d_vit), np.float32)
                if take:
                    np.take(src, idx[a : a + batch], axis=0, out=out, mode="clip")
                else:
                    np.copyto(out, src[a : a + batch])
            best[k] = max(best[k], rows // batch * batch / (time.perf_counter() - t0))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-root", type=pathlib.Path, default=None)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--n-imgs", type=int, default=1024)
    parser.add_argument("--d-vit", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--buffer-mb", type=float, default=None, help="default: data size / 4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.shard_root is None:
            root = pathlib.Path(tmp) / "s"
            shards = synthetic(root, args.n_imgs, args.d_vit, args.n_layers, args.dtype)
        else:
            shards = Shards(args.shard_root)
        md = shards.md
        pos = shards.layer_pos(args.layer)
        size = sum((shards.root / md.shard_file(i)).stat().st_size for i in range(md.n_shards))
        if args.buffer_mb is None:
            args.buffer_mb = size / md.n_layers / 4 / 2**20 * 4 / md.np_dtype.itemsize
        print(f"shards: {shards!r}, {size / 2**20:.0f} MiB; cpus: {os.cpu_count()}")
        print(
            f"batch {args.batch_size}, {args.epochs} epochs per run, loader buffer "
            f"{args.buffer_mb:.0f} MiB, {args.threads} threads, best of {args.repeats}"
        )
        # Both readers keep their buffers between runs, and each runs once untimed: the page
        # cache is warm and first-touch page faults of the buffers (a one-off per training
        # run) are not counted.
        buf = np.empty(max(32 * 2**20 // md.bytes_per_img, 1) * md.bytes_per_img, np.uint8)
        loaders = {
            "loader": make_loader(shards, args, None),
            "loader (90% split)": make_loader(shards, args, split_images(md.n_imgs, 0.1, 0)[0]),
        }
        runs = {
            "sequential": lambda: sequential(shards, pos, args.batch_size, args.epochs, buf),
            **{
                name: lambda loader=loader: sum(
                    x.shape[0] for x in loader.batches(n_epochs=args.epochs)
                )
                for name, loader in loaders.items()
            },
        }
        for fn in runs.values():
            fn()
        rate = dict.fromkeys(runs, 0.0)
        cpu = dict.fromkeys(runs, float("inf"))  # CPU seconds per million tokens
        for _ in range(args.repeats):
            for name, fn in runs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                n = fn()
                wall, c = time.perf_counter() - t0, time.process_time() - c0
                rate[name] = max(rate[name], n / wall)
                cpu[name] = min(cpu[name], c / n * 1e6)
        for name in runs:
            print(
                f"{name:>20}: {rate[name]:,.0f} patches/s "
                f"({rate[name] * md.d_vit * 4 / 2**20:,.0f} MiB/s float32), "
                f"{cpu[name]:.2f} CPU s per M patches"
            )
        for name in ("loader", "loader (90% split)"):
            print(
                f"ratio {name}/sequential: {rate[name] / rate['sequential']:.2f} wall-clock "
                f"(target >= 0.8), {cpu['sequential'] / cpu[name]:.2f} CPU efficiency"
            )
        take, copy = gather_vs_copy(md, args.batch_size, args.buffer_mb)
        print(
            f"batch step alone, no IO: random-row gather {take:,.0f} rows/s vs contiguous copy "
            f"{copy:,.0f} rows/s (gather costs {copy / take:.1f}x the copy)"
        )


if __name__ == "__main__":
    main()
