"""saev alone on the data sets of benchmarks/peers.py: one sweep, scored the same way.

The recipe measurements in docs/benchmarks.md (default lr per family, λ per L0, what a change
does at matched L0) train saev only: this script trains one `saev train` sweep of any family
on peers.py's planted-hard / planted-easy / planted / vit shards (written or recorded once and
cached, exactly as peers.py does) and scores every member with peers.py's `score` on the same
held-out tokens: L0, FVU, dead fraction, and on planted data MMCS and the atoms recovered.

Any sweep-TOML key goes in with `--saev-arg KEY=VALUE`; a TOML list is a grid axis, so one
run can sweep λ and lr together. `--ref OLD.json` (a file this script wrote) then reads both
runs' FVU and MMCS at each other's L0s (linear in log L0, as peers.py's relu comparison),
one curve per learning rate:

    python benchmarks/recipe.py planted-hard relu --coeffs 0.003 0.03 0.1 0.3 1 --n-tokens 1000000 --json base.json
    python benchmarks/recipe.py planted-hard relu --coeffs 0.003 0.03 0.1 0.3 1 --n-tokens 1000000 \\
        --saev-arg "lr=[0.0226, 0.0339]" --ref base.json
    python benchmarks/recipe.py vit gated --coeffs 0.03 0.1 0.3 --saev-arg seed=1
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers  # noqa: E402  (puts the repository root first on sys.path)

import saev.nn  # noqa: E402
from saev.errors import UserError  # noqa: E402
from saev.helpers import keep_freed_memory, resolve_device  # noqa: E402


def train_and_score(args) -> list[dict]:
    """Train the sweep; one row per member: its lr, swept hyperparameters and scores."""
    ds = peers.datasets(args)[args.dataset]
    if "k" in saev.nn.HPARAMS[args.family] and not any(
        a.startswith("sae.k=") for a in args.saev_arg
    ):
        args.saev_arg = [*args.saev_arg, f"sae.k={ds.k}"]  # the data set's k, as peers.py
    cache = (args.cache or args.peers / "cache").resolve()
    shards, atoms, desc = peers.dataset_shards(ds, args, cache)
    print(f"{args.dataset}: {desc}; {ds.n_tokens:,} training tokens; shards {shards}", flush=True)
    device = resolve_device(args.device)
    keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="recipe-") as work:
        t0 = time.perf_counter()
        trained = peers.train_saev(shards, ds, args.family, args.coeffs, args, pathlib.Path(work))
        print(f"trained {len(trained)} SAEs in {time.perf_counter() - t0:.0f} s", flush=True)
        x = peers.eval_tokens(shards, trained[0].ckpt, args.n_eval)
        rows = []
        for t in trained:
            s = peers.score(t.encode, t.decode, t.d_sae, x, atoms, device)
            cfg = saev.nn.load(t.ckpt).cfg
            rows.append(
                {
                    "member": t.ckpt.name,
                    "lr": cfg["lr"],
                    "hparams": cfg["hparams"],
                    "l0": s.l0,
                    "fvu": s.fvu,
                    "dead": s.dead_frac,
                    "mmcs": s.mmcs,
                    "atoms_09": s.frac_09,
                    "tokens_per_s": t.tokens_per_s,
                }
            )
    return rows


def print_rows(rows: list[dict]) -> None:
    swept = sorted(
        k for k in rows[0]["hparams"] if len({json.dumps(r["hparams"][k]) for r in rows}) > 1
    )
    print(
        f"  {'lr':>9} "
        + "".join(f"{k:>15} " for k in swept)
        + "      L0     FVU   dead   MMCS  >0.9"
    )
    for r in sorted(rows, key=lambda r: (r["lr"], *(str(r["hparams"][k]) for k in swept))):
        print(
            f"  {r['lr']:>9.4g} "
            + "".join(f"{r['hparams'][k]!s:>15} " for k in swept)
            + f"{r['l0']:>8.2f} {r['fvu']:>7.4f} {r['dead']:>6.3f} "
            + f"{peers.fmt(r['mmcs'], '6.3f'):>6} {peers.fmt(r['atoms_09'], '5.2f'):>5}"
        )


def compare(rows: list[dict], ref: list[dict]) -> None:
    """FVU (ratio) and MMCS (difference) of each run at the other's L0s, per lr curve."""
    ref_curve = ref  # one curve: main() refuses a reference with several lrs
    for lr in sorted({r["lr"] for r in rows}):
        curve = [r for r in rows if r["lr"] == lr]
        for name, points, other, sign in (
            ("this / ref at ref's L0s", ref_curve, curve, 1),
            ("this / ref at this run's L0s", curve, ref_curve, -1),
        ):
            parts = []
            for p in sorted(points, key=lambda r: -r["l0"]):
                fvu = peers.interp_log_l0([(o["l0"], o["fvu"]) for o in other], p["l0"])
                mmcs = peers.interp_log_l0([(o["l0"], o["mmcs"]) for o in other], p["l0"])
                if fvu is None:
                    parts.append(f"L0 {p['l0']:.1f}: -")
                    continue
                ratio = fvu / p["fvu"] if sign > 0 else p["fvu"] / fvu
                text = f"L0 {p['l0']:.1f}: {ratio:.3f}"
                if mmcs is not None and p["mmcs"] is not None:
                    text += f" ({sign * (mmcs - p['mmcs']):+.3f})"
                parts.append(text)
            print(f"  lr {lr:.4g}, {name}: " + " | ".join(parts))
    print("  (FVU ratio < 1: this run reconstructs better; MMCS difference in brackets)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=["planted-hard", "planted-easy", "planted", "vit"],
                        help="one of peers.py's data sets (`planted`: set by --d, --n-atoms, ...)")  # fmt: skip
    parser.add_argument("family", choices=saev.nn.FAMILIES, help="the saev family to sweep")
    parser.add_argument("--coeffs", type=float, nargs="+", default=None,
                        help="sae.sparsity_coeff values (a grid axis); default: the family's default")  # fmt: skip
    parser.add_argument("--saev-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="saev train setting (sweep-TOML key and value), e.g. lr=[1e-3,2e-3], seed=1")  # fmt: skip
    parser.add_argument("--peers", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("SAEV_PEERS", peers.REPO / ".peers")),
                        help="only for the default shard cache, PEERS/cache (no peer is trained)")  # fmt: skip
    peers.add_data_args(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--ref", type=pathlib.Path, default=None,
                        help="a JSON this script wrote: compare at matched L0")  # fmt: skip
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the rows here")
    args = parser.parse_args()
    ref = None
    if args.ref is not None:
        try:
            ref = json.loads(args.ref.read_text())["rows"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"--ref {args.ref}: not a JSON written by recipe.py ({err})") from err
    if args.coeffs and "sparsity_coeff" not in saev.nn.HPARAMS[args.family]:
        parser.error(
            f"--coeffs: {args.family} has no sparsity_coeff (sweep its own key with --saev-arg)"
        )
    if ref is not None and len({r["lr"] for r in ref}) > 1:
        raise UserError(
            f"--ref {args.ref}: holds several learning rates; compare against a run of one lr"
        )
    rows = train_and_score(args)
    print_rows(rows)
    if ref is not None:
        compare(rows, ref)
    if args.json is not None:
        doc = {
            "dataset": args.dataset,
            "family": args.family,
            "saev_arg": args.saev_arg,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
