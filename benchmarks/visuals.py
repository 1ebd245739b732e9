"""Benchmark the visuals top-k pass: patches/s, and peak memory at two dataset sizes 10x apart.

DESIGN §8: the pass's memory is O(d_sae x top_n), independent of the number of images, so
the printed memory ratio (large / small) should be about 1.0.

Each size runs in a fresh subprocess so peak-memory readings do not mix. On CPU the peak
is the process's max RSS above its level just before the pass (it includes the working set
of one batch and the top-k state); on CUDA it is torch's peak allocated GPU memory. Batches
come from a fixed pool of generated activations cycled with fresh image ids, so both sizes
hold the same input data in memory and only the number of images differs.

    python benchmarks/visuals.py                      # small defaults for a 2-core CPU
    python benchmarks/visuals.py --device cuda --d-vit 1024 --d-sae 16384 --n-imgs 2000
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> dict:
    import torch

    from saev.visuals import topk

    torch.manual_seed(0)
    device = torch.device(args.device)
    enc = torch.nn.Linear(args.d_vit, args.d_sae).to(device)
    pool = [
        torch.randn(args.batch_size, args.n_patches, args.d_vit, device=device) for _ in range(4)
    ]

    def encode(x):
        return torch.relu(enc(x) - 1.0)  # sparse-ish codes, like a trained SAE

    def batches():
        for b, start in enumerate(range(0, args.n_imgs, args.batch_size)):
            n = min(args.batch_size, args.n_imgs - start)
            yield torch.arange(start, start + n), pool[b % len(pool)][:n]

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = topk.run_pass(
        batches(), encode, d_sae=args.d_sae, top_n=args.top_n, device=device, n_imgs=args.n_imgs
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    secs = time.perf_counter() - t0
    state = topk.TopKAccumulator(args.d_sae, args.top_n, "meta").state_nbytes()
    return {
        "n_imgs": res.n_imgs,
        "patches": res.n_tokens,
        "seconds": secs,
        "peak_bytes": peak,
        "state_bytes": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-imgs", type=int, default=100, help="small size; large is 10x")
    parser.add_argument("--n-patches", type=int, default=64)
    parser.add_argument("--d-vit", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--top-n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    runs = []
    for n_imgs in (args.n_imgs, 10 * args.n_imgs):
        opts = {**vars(args), "n_imgs": n_imgs}
        cmd = [sys.executable, __file__, "--worker"]
        for k, v in opts.items():
            if k != "worker":
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))

    mib = 1 << 20
    print(
        f"visuals top-k pass on {args.device}: d_vit={args.d_vit} d_sae={args.d_sae} "
        f"top_n={args.top_n} n_patches={args.n_patches} batch={args.batch_size} images"
    )
    print(f"top-k state: {runs[0]['state_bytes'] / mib:.2f} MiB (O(d_sae x top_n))")
    for r in runs:
        print(
            f"  {r['n_imgs']:>7} images  {r['patches']:>10,} patches  "
            f"{r['patches'] / r['seconds']:>12,.0f} patches/s  peak {r['peak_bytes'] / mib:8.1f} MiB"
        )
    ratio = runs[1]["peak_bytes"] / max(runs[0]["peak_bytes"], 1)
    print(f"memory ratio (10x images / 1x images): {ratio:.2f}  (target ~1.0)")


if __name__ == "__main__":
    main()
