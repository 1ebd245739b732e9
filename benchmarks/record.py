"""Recording throughput vs the bare ViT forward (DESIGN §8: target ratio >= 0.95).

Both sides use the same model, device, batch size and images. The bare side runs the full
forward on images already decoded and transformed in memory (the best case); the recording
side is the real `saev activations` path (`saev.activations.record`) end to end: image
decoding in DataLoader workers, hooks, the background shard writer, fsync.

    python benchmarks/record.py --vit-family clip --vit-ckpt ViT-B-16 --n-imgs 4096 --batch-size 256 --n-workers 8
"""

import argparse
import tempfile
import time

import torch

import saev.activations as rec
from saev.images import Demo, ImageDataset
from saev.vits import make_vit


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vit-family", default="timm")
    ap.add_argument("--vit-ckpt", default="vit_small_patch16_224")
    ap.add_argument("--layers", type=int, nargs="+", default=[-2])
    ap.add_argument("--n-imgs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        images = Demo(root=f"{tmp}/imgs", n_imgs=args.n_imgs, size=96)
        cfg = rec.Config(
            vit_family=args.vit_family,
            vit_ckpt=args.vit_ckpt,
            vit_layers=args.layers,
            random_weights=True,
            images=images,
            dump_to=f"{tmp}/dump",
            batch_size=args.batch_size,
            n_workers=args.n_workers,
            device=args.device,
            dtype=args.dtype,
        )
        device = torch.device(rec.resolve_device(args.device))
        il = images.load()  # generate before timing either side

        # Bare forward: pre-transformed images in memory, full model, no hooks, nothing written.
        vit = make_vit(args.vit_family, args.vit_ckpt, pretrained=False).to(device)
        ds = ImageDataset(il, vit.transform, vit.image_size)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        batches = [x[i : i + args.batch_size].to(device) for i in range(0, len(x), args.batch_size)]
        with torch.inference_mode():
            vit(batches[0])  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                vit(b)
            sync(device)
        bare = len(x) / (time.perf_counter() - t0)
        del vit, batches, x

        t0 = time.perf_counter()
        rec.record(cfg)
        sync(device)
        recorded = args.n_imgs / (time.perf_counter() - t0)

    print(
        f"model {args.vit_family}:{args.vit_ckpt} layers {args.layers} on {device}, batch {args.batch_size}, {args.n_imgs} images"
    )
    print(f"bare forward:   {bare:9.1f} img/s")
    print(
        f"saev activations:{recorded:9.1f} img/s (end to end, incl. model build and dataset scan)"
    )
    print(f"ratio: {recorded / bare:.3f} (target >= 0.95)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
