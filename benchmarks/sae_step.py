"""Training-step time of TopK SAEs: a loop over S separate SAEs vs one stack, dense vs sparse decode;
and of a ReLU SAE with dense products vs its sparse path, by L0.

For each width and S it times one full step (forward, backward, StackAdam step) of
  (a) loop:   S separate single-SAE stacks, each run on the batch in a Python loop (dense top-k
              decode: codes scattered to [B, d_sae] and multiplied by W_dec, as the reference saev does),
  (b) stack:  one stack of S members with that same dense decode,
  (c) sparse: one stack of S members with saev's sparse encoder backward and embedding-bag decode,
and the time of the encoder forward matmul alone. It prints the ratios of DESIGN §8:
stack vs loop (want >= 1 at every S), topk step / encoder matmul (want <= 1.3), and the
bfloat16 step over the float32 one (want <= 0.9). On a CPU with bfloat16 GEMMs the float32 topk
step selects its latents through a bfloat16 screen (saev.nn.screen: a bfloat16 GEMM, a rigorous
error bound, float32 values for the candidates); the step without it is printed as well.

    python benchmarks/sae_step.py                # full sizes: d=768, widths 8x,16x, k=32, batch 4096, S 1,4,16 (GPU)
    python benchmarks/sae_step.py --quick        # small sizes that finish in minutes on a CPU
    python benchmarks/sae_step.py --S 1 --widths 8 --relu-l0 --profile 5   # where a topk step's time goes
    python benchmarks/sae_step.py --d 64 --widths 8 --S 1 --relu-l0 --relu-sweep 204 133 34 11 3
    python benchmarks/sae_step.py --d 384 --widths 8 --S 1 --relu-l0 --also batchtopk matryoshka
    python benchmarks/sae_step.py --S 1 --widths 8 --relu-l0 --auxk-dead 0.02 0.15 0.3 0.5
"""

import argparse
import statistics
import time

import torch

import saev.nn
from saev.helpers import keep_freed_memory


def dense_topk_step(stack: saev.nn.Stack, opt: saev.nn.StackAdam, x: torch.Tensor) -> None:
    """A dense top-k step on the stack's own parameters (the baseline the sparse path replaces)."""
    xs = stack.scaled(x)
    pre = stack.pre_acts(xs)
    k = int(stack.hp("k").max())
    top = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recon = torch.baddbmm(stack.b_dec[:, None, :], f, stack.W_dec)
    loss = (xs - recon).pow(2).sum(-1).mean(-1)
    opt.zero_grad()
    loss.sum().backward()
    opt.step()


def sparse_step(
    stack: saev.nn.Stack, opt: saev.nn.StackAdam, x: torch.Tensor, bf16: bool = False
) -> None:
    """One training step as `saev train` takes it (`--dtype bfloat16`: autocast forward)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = stack(x)
    opt.zero_grad()
    out.losses["total"].sum().backward()
    opt.step()


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_group(
    args, d_sae: int, S: int, x: torch.Tensor, device: torch.device
) -> tuple[float, float, float]:
    """Seconds per step of (a) the loop, (b) the dense stack, (c) the sparse stack."""
    members = [{"k": args.k, "seed": i} for i in range(S)]
    singles = [
        saev.nn.make_stack("topk", d_vit=args.d, d_sae=d_sae, members=[m], device=device)
        for m in members
    ]
    single_opts = [saev.nn.StackAdam(s, lr=1e-4) for s in singles]
    stack = saev.nn.make_stack("topk", d_vit=args.d, d_sae=d_sae, members=members, device=device)
    opt = saev.nn.StackAdam(stack, lr=1e-4)

    def loop():
        for s, o in zip(singles, single_opts, strict=True):
            dense_topk_step(s, o, x)

    t_loop = timed(loop, args.iters, device)
    t_stack = timed(lambda: dense_topk_step(stack, opt, x), args.iters, device)
    t_sparse = timed(lambda: sparse_step(stack, opt, x), args.iters, device)
    return t_loop, t_stack, t_sparse


def one_sae(args, family: str, d_sae: int, device: torch.device, x=None) -> saev.nn.Stack:
    """One SAE of a k family (k = --k) on `device`, initialised from x's first 2,048 tokens
    when x is given."""
    one = saev.nn.make_stack(
        family, d_vit=args.d, d_sae=d_sae, members=[{"k": args.k}], device=device
    )
    if x is not None:
        one.init_from_data(x[:2048])
    return one


def bench_matmul_ratio(
    args, d_sae: int, x: torch.Tensor, device: torch.device
) -> tuple[float, float, float]:
    """Seconds of the float32 encoder forward matmul alone, of a full (sparse) topk step of one
    SAE in float32, and of the same step with bfloat16 autocast (`--dtype bfloat16`)."""
    one = one_sae(args, "topk", d_sae, device)
    opt = saev.nn.StackAdam(one, lr=1e-4)
    xs = x[None]
    # Into one buffer: a fresh [B, d_sae] output each call is paged in anew until the allocator
    # settles (+20% on this CPU, more after a big allocation elsewhere), which would flatter
    # the ratio; the step itself runs with its buffers reused, as thousands of steps do.
    buf = torch.empty(1, x.shape[0], d_sae, device=device)
    with torch.no_grad():
        t_mm = timed(
            lambda: torch.baddbmm(one.b_enc[:, None, :], xs, one.W_enc, out=buf),
            args.iters,
            device,
        )
    t_step = timed(lambda: sparse_step(one, opt, x), args.iters, device)
    t_bf16 = timed(lambda: sparse_step(one, opt, x, bf16=True), args.iters, device)
    # The same step with every pre-activation from the float32 GEMM (no bfloat16 screen).
    one.screen_from_d_sae = None
    t_gemm = timed(lambda: sparse_step(one, opt, x), args.iters, device)
    return t_mm, t_step, t_bf16, t_gemm


def bench_family_step(args, family: str, d_sae: int, x: torch.Tensor, device: torch.device):
    """Seconds per float32 training step of one SAE of another k family (`--also`)."""
    one = one_sae(args, family, d_sae, device, x)
    opt = saev.nn.StackAdam(one, lr=1e-4)
    return timed(lambda: sparse_step(one, opt, x), args.iters, device)


def bench_auxk(args, d_sae: int, dead: float, x: torch.Tensor, device: torch.device) -> float:
    """Seconds per float32 topk step of one SAE with a share `dead` of its latents dead (the
    same random ones every step), so that AuxK runs (`--auxk-dead`)."""
    one = one_sae(args, "topk", d_sae, device, x)
    opt = saev.nn.StackAdam(one, lr=1e-8)  # tiny steps: nothing revives
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(d_sae, generator=g) < dead).to(device)

    def step():
        with torch.no_grad():  # training resets the counters of latents that fired
            one.tokens_since_fired[0] = torch.where(mask, 2**62, 0)
        sparse_step(one, opt, x)

    return timed(step, args.iters, device)


@torch.no_grad()
def place_l0(stack: saev.nn.Stack, l0s: list[float], x: torch.Tensor) -> list[float]:
    """Shift each member's encoder bias so that about l0s[s] latents per token are active (a
    quantile of its pre-activations on 512 tokens); returns the L0s reached on all of x."""
    pre = stack.pre_acts(stack.scaled(x[:512]))
    for s, l0 in enumerate(l0s):
        stack.b_enc[s] -= torch.quantile(pre[s].flatten().float(), 1 - l0 / stack.d_sae)
    return (stack.pre_acts(stack.scaled(x)) > 0).sum(-1).float().mean(-1).tolist()


def bench_relu(args, d_sae: int, l0: float, x: torch.Tensor, device: torch.device):
    """Seconds per relu step (one SAE) with dense products and with the sparse path, the bias
    set so that `l0` latents per token are active; and the L0 reached."""
    times, got = [], 0.0
    for sparse_below in (-1.0, float("inf")):  # never sparse; always sparse
        one = saev.nn.make_stack("relu", d_vit=args.d, d_sae=d_sae, members=[{}], device=device)
        one.sparse_below = one.sparse_below_gpu = sparse_below  # forced, on any device
        (got,) = place_l0(one, [l0], x)
        opt = saev.nn.StackAdam(one, lr=1e-8)  # tiny steps: the L0 stays where it was set
        times.append(timed(lambda one=one, opt=opt: sparse_step(one, opt, x), args.iters, device))
    return times[0], times[1], got


def bench_relu_sweep(args, d_sae: int, x: torch.Tensor, device: torch.device):
    """Seconds per step of one relu stack whose members sit at the L0s of `args.relu_sweep`
    (a λ sweep after warm-up: each member on the path it chooses itself), the L0s reached and
    the paths chosen."""
    members = [{"seed": i} for i in range(len(args.relu_sweep))]
    stack = saev.nn.make_stack("relu", d_vit=args.d, d_sae=d_sae, members=members, device=device)
    got = place_l0(stack, args.relu_sweep, x)
    with torch.no_grad():
        sparse = stack._sparse_members(stack.pre_acts(stack.scaled(x)))
    paths = ["sparse" if p else "dense" for p in sparse]
    opt = saev.nn.StackAdam(stack, lr=1e-8)  # tiny steps: the L0s stay where they were set
    return timed(lambda: sparse_step(stack, opt, x), args.iters, device), got, paths


def profile_topk_step(args, d_sae: int, x: torch.Tensor, device: torch.device) -> None:
    """torch.profiler's table of `args.profile` float32 topk steps of one SAE, by self time on the
    device that runs them (on a GPU also the host's table: there a small step waits on the host)."""
    from torch.profiler import ProfilerActivity, profile

    one = one_sae(args, "topk", d_sae, device)
    opt = saev.nn.StackAdam(one, lr=1e-4)
    for _ in range(3):
        sparse_step(one, opt, x)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.profile):
            sparse_step(one, opt, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True)
    keys = (
        ["self_cuda_time_total", "self_cpu_time_total"]
        if device.type == "cuda"
        else ["self_cpu_time_total"]
    )
    for key in keys:
        print(f"  {args.profile} topk steps, {d_sae} latents, by {key}:")
        print(table.table(sort_by=key, row_limit=20, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="d=128, width 8x, batch 1024, S 1,4, k=16"
    )
    parser.add_argument("--d", type=int, default=768, help="d_vit, the input width")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="expansion factors")
    parser.add_argument("--k", type=int, default=32, help="k of the top-k SAEs")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument(
        "--S", type=int, nargs="+", default=[1, 4, 16], help="stack sizes for the loop comparison"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda if present)")
    parser.add_argument(
        "--relu-l0",
        type=float,
        nargs="*",
        default=[16, 64, 256, 512, 1024],
        help="L0s at which to time a relu step with dense products vs the sparse path",
    )
    parser.add_argument(
        "--relu-sweep",
        type=float,
        nargs="*",
        default=[],
        metavar="L0",
        help="also time one relu stack with a member at each of these L0s (e.g. 204 133 34 11 3)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also profile N topk steps per width"
    )
    parser.add_argument(
        "--auxk-dead",
        type=float,
        nargs="*",
        default=[],
        metavar="SHARE",
        help="also time the topk step with these shares of dead latents, AuxK on (k_aux 512)",
    )
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        choices=["batchtopk", "matryoshka", "vsae-topk"],
        metavar="FAMILY",
        help="also time one float32 step of these k families (batchtopk, matryoshka, vsae-topk)",
    )
    args = parser.parse_args()
    if args.quick:
        args.d, args.widths, args.batch, args.S, args.k, args.iters = 128, [8], 1024, [1, 4], 16, 3
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    kept = keep_freed_memory()  # as `saev train` runs its steps
    print(
        f"device={device} d={args.d} k={args.k} batch={args.batch} threads={torch.get_num_threads()}"
        f" malloc keeps freed memory: {'yes' if kept else 'no'}"
    )
    x = torch.randn(args.batch, args.d, device=device)
    print(
        f"{'width':>7} {'S':>3} {'loop ms':>9} {'stack ms':>9} {'sparse ms':>9} {'stack/loop':>10} {'sparse/loop':>11}"
    )
    for width in args.widths:
        for S in args.S:
            t_loop, t_stack, t_sparse = bench_group(args, width * args.d, S, x, device)
            print(
                f"{width:>6}x {S:>3} {t_loop * 1e3:9.1f} {t_stack * 1e3:9.1f} {t_sparse * 1e3:9.1f}"
                f" {t_loop / t_stack:10.2f} {t_loop / t_sparse:11.2f}"
            )
        t_mm, t_step, t_bf16, t_gemm = bench_matmul_ratio(args, width * args.d, x, device)
        print(
            f"  width {width}x: encoder matmul {t_mm * 1e3:.1f} ms, topk step {t_step * 1e3:.1f} ms,"
            f" ratio {t_step / t_mm:.2f}; bfloat16 step {t_bf16 * 1e3:.1f} ms,"
            f" bf16/fp32 {t_bf16 / t_step:.2f}; without the bfloat16 screen"
            f" {t_gemm * 1e3:.1f} ms, ratio {t_gemm / t_mm:.2f}"
        )
        for dead in args.auxk_dead:
            t_aux = bench_auxk(args, width * args.d, dead, x, device)
            print(
                f"  width {width}x: topk step with {dead:.0%} of latents dead (AuxK on)"
                f" {t_aux * 1e3:.1f} ms, {t_aux / t_mm:.2f} x the encoder matmul"
            )
        for family in args.also:
            t_fam = bench_family_step(args, family, width * args.d, x, device)
            print(
                f"  width {width}x: {family} step {t_fam * 1e3:.1f} ms,"
                f" {t_fam / t_mm:.2f} x the encoder matmul"
            )
        if args.profile:
            profile_topk_step(args, width * args.d, x, device)
        for l0 in args.relu_l0:
            t_dense, t_sparse, got = bench_relu(args, width * args.d, l0, x, device)
            print(
                f"  width {width}x relu at L0 {got:6.0f} ({got / (width * args.d):6.1%} active):"
                f" dense {t_dense * 1e3:7.1f} ms, sparse {t_sparse * 1e3:7.1f} ms,"
                f" dense/sparse {t_dense / t_sparse:5.2f}"
            )
        if args.relu_sweep:
            t_sweep, got, paths = bench_relu_sweep(args, width * args.d, x, device)
            print(
                f"  width {width}x relu stack of {len(got)} at L0 "
                + ", ".join(f"{g:.0f} ({p})" for g, p in zip(got, paths, strict=True))
                + f": {t_sweep * 1e3:.1f} ms per step"
            )
    print(
        "stack/loop, sparse/loop: > 1 means faster than the loop. ratio: topk step / float32"
        " encoder matmul (target <= 1.3). bf16/fp32: the step with --dtype bfloat16 over float32"
        " (target <= 0.9). relu dense/sparse: > 1 where the sparse path pays (ReLUStack.sparse_below)."
    )


if __name__ == "__main__":
    main()
