"""Spliced forward vs clean forward (issue 15: target ratio >= 0.8).

`saev evaluate --downstream` runs the ViT once with each SAE in place of a layer. This times
that spliced pass (the `splice` hook, the SAE's encode and decode on the trained tokens, the
copy back) against the clean forward on the same pre-transformed images, same model, device
and batch size. Both sides include the classifier and its log-softmax, as in the evaluation.
Rounds alternate between the two sides and the median of each is kept, so a noisy machine
hurts both alike.

    python benchmarks/downstream.py --vit-ckpt vit_base_patch16_224 --exp-factor 16 --k 32 --device cuda
"""

import argparse
import statistics
import time

import torch

import saev.nn
from saev.downstream import keep_in, replace_tokens, run_model, sae_fn
from saev.helpers import resolve_device
from saev.vits import make_vit


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vit-family", default="timm")
    ap.add_argument("--vit-ckpt", default="vit_small_patch16_224")
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--tokens", default="patches", choices=["patches", "cls", "all"])
    ap.add_argument("--family", default="topk", help="SAE family")
    ap.add_argument("--exp-factor", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-imgs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    vit = make_vit(args.vit_family, args.vit_ckpt, pretrained=False, head=True).to(device)
    block = vit.resolve_layers([args.layer])[0]
    cls = int(vit.cls_token)
    sl = {"patches": slice(cls, None), "cls": slice(0, 1), "all": slice(None)}[args.tokens]
    x = torch.randn(args.n_imgs, 3, *vit.image_size)
    batches = [x[i : i + args.batch_size].to(device) for i in range(0, len(x), args.batch_size)]

    d_sae = args.exp_factor * vit.d_vit
    hp = {"k": args.k} if "k" in saev.nn.HPARAMS[args.family] else {}
    stack = saev.nn.make_stack(args.family, d_vit=vit.d_vit, d_sae=d_sae, members=[hp])
    stack = stack.to(device)
    with torch.inference_mode():  # a realistic input scale and b_dec: the layer's own tokens
        acts: list[torch.Tensor] = []
        run_model(vit, batches[0], block, replace_tokens(sl, keep_in(acts)))
        stack.init_from_data(acts[0].reshape(-1, vit.d_vit).clone())
    sae = stack.member(0).to(device)
    spliced_fn = replace_tokens(sl, sae_fn(sae))

    def clean() -> None:
        for b in batches:
            run_model(vit, b, block)

    def spliced() -> None:
        for b in batches:
            run_model(vit, b, block, spliced_fn)

    with torch.inference_mode():
        clean(), spliced()  # warm-up
        times: dict[str, list[float]] = {"clean": [], "spliced": []}
        for _ in range(args.rounds):
            for name, fn in (("clean", clean), ("spliced", spliced)):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    rate = {name: args.n_imgs / statistics.median(ts) for name, ts in times.items()}

    print(
        f"model {args.vit_family}:{args.vit_ckpt} block {block} tokens {args.tokens} on {device}, "
        f"batch {args.batch_size}, {args.n_imgs} images x {args.rounds} rounds; "
        f"SAE {args.family} d_sae {d_sae} (x{args.exp_factor}) k {args.k}"
    )
    print(f"clean forward:   {rate['clean']:9.1f} img/s")
    print(f"spliced forward: {rate['spliced']:9.1f} img/s")
    print(f"ratio: {rate['spliced'] / rate['clean']:.3f} (target >= 0.8)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
