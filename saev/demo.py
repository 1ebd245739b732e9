"""`python -m saev demo`: the whole pipeline on a small bundled dataset, on CPU, in minutes.

Each step is a real `python -m saev ...` command line: it is printed, then parsed by that
command's own `Config` and run, so what you see is exactly what ran and can be rerun on your
own data. The steps:

1. `activations` on the generated `demo` images (shapes with planted colour/shape/size labels
   and one pure-noise label) with a small ViT;
2. `train` a mixed sweep (topk and relu, two values each) in one pass over the shards;
3. `evaluate` every member (L0-FVU Pareto plot, sweep table);
4. `probe` the planted labels in raw ViT features and in the best member's latents;
5. `visuals` for the best member, including every latent the probe report links to;
and finally `OUT/index.html`, one page that links all of it.

By default the ViT is timm's tiny `test_vit` with RANDOM weights (no download is possible or
needed): the pipeline is real, but the features of an untrained ViT mean little. Pass a real
checkpoint (e.g. `--vit-family clip --vit-ckpt ViT-B-32/openai`) to use pretrained weights.
"""

import csv
import dataclasses
import html
import importlib
import json
import pathlib
import shlex
import shutil
import time
import typing

import tyro

from saev.__main__ import COMMANDS
from saev.errors import UserError
from saev.helpers import atomic_write_json, atomic_write_text

TINY_VIT = ("timm", "test_vit")
"""The default backbone: timm's tiny test ViT (6 blocks, d=64, 10x10 patches), random weights."""

MARKER = "demo.json"
"""Written into OUT so a rerun knows the directory is the demo's own and may be refreshed."""

OUTPUTS = ("runs", "eval", "probe", "visuals", "index.html", "sweep.toml")
"""What a rerun rewrites; images/ and shards/ are kept and reused (recording resumes)."""

SWEEP_TOML = """\
# The demo's sweep: two families x two values, trained together in ONE pass over the shards.
# Every batch is read once and fed to both stacks (topk and relu). See docs/sweep.md.
n_train = {n_train}
lr = 1e-3           # lr_warmup defaults to 5% of n_train
n_init_sample = 20_000
n_eval = 0         # `saev evaluate` scores the members next
ckpt_every = 0     # checkpoints at the end only; a real run keeps periodic ones
log_every = 25
seed = 0

[data]
layer = -2
tokens = "patches"
batch_size = 1024
eval_frac = 0.2
n_threads = 2

[sae]
family = ["topk", "relu"]
exp_factor = 8
k = [8, 24]                   # topk only
sparsity_coeff = [0.3, 1.0]   # relu only
sparsity_warmup = 50_000
dead_after_tokens = 100_000
"""


@dataclasses.dataclass(frozen=True)
class Config:
    """Run the whole pipeline (activations, train, evaluate, probe, visuals) on a small bundled dataset."""

    out: pathlib.Path = pathlib.Path("saev-demo")
    """Directory for everything the demo writes; ends with OUT/index.html linking all of it."""
    vit_family: typing.Literal["clip", "siglip", "dinov2", "timm"] = "timm"
    """Backbone family of --vit-ckpt."""
    vit_ckpt: str | None = None
    """A real checkpoint to record (pretrained weights, e.g. ViT-B-32/openai with --vit-family clip); default: timm's tiny test_vit with random weights."""
    random_weights: bool = False
    """Use random weights for --vit-ckpt too (the default tiny ViT always has random weights)."""
    n_imgs: int = 500
    """Number of generated demo images."""
    n_train: int = 500_000
    """Training tokens per SAE."""
    device: str = "auto"
    """Torch device for every step: auto (cuda if available, else cpu), cpu, cuda, ..."""


def main(cfg: Config) -> None:
    t0 = time.perf_counter()
    out = prepare_out(cfg.out)
    family, ckpt = (cfg.vit_family, cfg.vit_ckpt) if cfg.vit_ckpt else TINY_VIT
    random_weights = cfg.random_weights or cfg.vit_ckpt is None
    if random_weights:
        print(
            f"Backbone: {family} {ckpt} with RANDOM weights. The pipeline is real, but an untrained "
            "ViT's features mean little; pass --vit-family/--vit-ckpt for a pretrained model."
        )
    else:
        print(f"Backbone: {family} {ckpt} with its pretrained weights.")

    step(
        1,
        "Record the residual stream of the ViT's second-to-last block over the demo images "
        "(shapes whose colour, shape and size are labels; 'noise' is a label unrelated to the pixels).",
        "activations",
        [
            "--vit-family", family,
            "--vit-ckpt", ckpt,
            *(["--random-weights"] if random_weights else []),
            "--vit-layers", "-2",
            "--batch-size", "32",
            "--n-workers", "1",
            "--device", cfg.device,
            "--dump-to", str(out / "shards"),
            "images:demo", "--images.root", str(out / "images"), "--images.n-imgs", str(cfg.n_imgs),
        ],
    )  # fmt: skip
    shards = only_child(out / "shards", "metadata.json")

    sweep = out / "sweep.toml"
    atomic_write_text(sweep, SWEEP_TOML.format(n_train=f"{cfg.n_train:_}"))
    step(
        2,
        f"Train a mixed sweep ({sweep}: topk with k=8,24 and relu with two L1 strengths) in one "
        "pass: each batch is read once and fed to both stacks.",
        "train",
        ["--sweep", str(sweep), "--data.shard-root", str(shards), "--run-root", str(out / "runs"),
         "--device", cfg.device],
    )  # fmt: skip
    run = only_child(out / "runs", "run.json")

    step(
        3,
        "Evaluate every member on the held-out images: L0, dead/dense latents, MSE, FVU, and the "
        "L0-FVU Pareto plot.",
        "evaluate",
        ["--ckpt", str(run), "--data.shard-root", str(shards), "--out", str(out / "eval"),
         "--device", cfg.device],
    )  # fmt: skip
    best, why = pick_best(out / "eval" / "sweep.csv")
    best_ckpt = run / "members" / best
    print(f"Best member: {best} ({why}).")

    step(
        4,
        f"Probe the labels in the raw ViT and in {best}'s latents: accuracy, aligned latents, "
        "ablations, intersections. 'noise' should stay at chance.",
        "probe",
        ["--data.shard-root", str(shards), "--ckpt", str(best_ckpt),
         "--attributes", "colour", "shape", "size", "noise",
         "--top-k", "1", "5", "10", "20", "50",
         "--visuals", str(out / "visuals"), "--out", str(out / "probe"), "--device", cfg.device],
    )  # fmt: skip
    report = json.loads((out / "probe" / "report.json").read_text())
    linked = [str(i) for i in report.get("latents_of_interest", [])]

    step(
        5,
        f"Render {best}'s top images with patch heatmaps, including every latent the probe "
        "report links to, as a static explorer.",
        "visuals",
        ["--ckpt", str(best_ckpt), "--data.shard-root", str(shards), "--out", str(out / "visuals"),
         "--top-n", "12", "--n-latents", "32", "--pick", "freq",
         "--log-freq-range", "-6", "0", "--log-value-range", "-4", "4",
         *(["--include-latents", *linked] if linked else []), "--device", cfg.device],
    )  # fmt: skip

    index = write_index(out, shards, run, best, why, random_weights, f"{family} {ckpt}")
    print(f"\nDone in {time.perf_counter() - t0:.0f} s. Open {index.resolve()}")


def prepare_out(out: pathlib.Path) -> pathlib.Path:
    """Create OUT, or refresh a previous demo's outputs in it; refuse a foreign non-empty dir."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"--out {out}: not empty and not a saev demo directory (no {MARKER}); "
            "pass an empty or new directory."
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    atomic_write_json(out / MARKER, {"what": "saev demo output directory"})
    return out


def step(n: int, explain: str, name: str, argv: list[str]) -> None:
    """Print the step and its command line, then run exactly that command line."""
    module = importlib.import_module(COMMANDS[name][0])
    print(f"\n[{n}/5] {explain}")
    print(f"$ python -m saev {name} {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    module.main(tyro.cli(module.Config, args=argv, prog=f"python -m saev {name}"))
    print(f"[{n}/5] {name} took {time.perf_counter() - t0:.1f} s")


def only_child(parent: pathlib.Path, marker: str) -> pathlib.Path:
    """The one directory under `parent` holding `marker` (each command names its own by hash)."""
    found = sorted(p.parent for p in parent.glob(f"*/{marker}"))
    if len(found) != 1:
        raise UserError(f"{parent}: expected one directory with {marker}, found {len(found)}.")
    return found[0]


def pick_best(sweep_csv: pathlib.Path) -> tuple[str, str]:
    """The member with the lowest FVU among the sparse ones (mean L0 at most 32)."""
    with open(sweep_csv, newline="") as fd:
        rows = [r for r in csv.DictReader(fd) if r["fvu"] not in ("", "nan")]
    if not rows:
        raise UserError(f"{sweep_csv}: no member has an FVU; training failed for every member.")
    sparse = [r for r in rows if float(r["l0_mean"]) <= 32] or rows
    best = min(sparse, key=lambda r: float(r["fvu"]))
    return best[
        "name"
    ], f"lowest FVU {float(best['fvu']):.3f} at mean L0 {float(best['l0_mean']):.1f}"


def write_index(
    out: pathlib.Path,
    shards: pathlib.Path,
    run: pathlib.Path,
    best: str,
    why: str,
    random_weights: bool,
    vit: str,
) -> pathlib.Path:
    """OUT/index.html: one static page linking every artefact the demo made."""

    def rel(p: pathlib.Path) -> str:
        return html.escape(p.relative_to(out).as_posix())

    with open(out / "eval" / "sweep.csv", newline="") as fd:
        rows = list(csv.DictReader(fd))
    cols = ["name", "family", "d_sae", "l0_mean", "fvu", "explained_variance"]
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    md = json.loads((shards / "metadata.json").read_text())
    weights = "RANDOM weights (untrained)" if random_weights else "pretrained weights"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>saev demo</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.warn {{ background: #fff3cd; padding: 0.5em 1em; border-radius: 4px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>saev demo</h1>
<p class="{"warn" if random_weights else ""}">Backbone: <b>{html.escape(vit)}</b> with {weights};
layer {md["layers"][0]} of {md["n_blocks"]}, d_vit={md["d_vit"]}, {md["n_imgs"]} images.</p>
<ol>
<li><b>Activations</b>: <a href="{rel(shards / "metadata.json")}">metadata.json</a>,
  <a href="{rel(shards / "images.csv")}">images.csv</a> (image index with labels).</li>
<li><b>Training</b>: <a href="{rel(out / "sweep.toml")}">sweep.toml</a>,
  <a href="{rel(run / "summary.md")}">summary.md</a>, one checkpoint per member under
  <a href="{rel(run / "members")}">members/</a>.</li>
<li><b>Evaluation</b>: <a href="eval/sweep.csv">sweep.csv</a>; best member <b>{html.escape(best)}</b>
  ({html.escape(why)}).
  <table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{table}</table>
  <p><img src="eval/pareto.png" alt="L0 vs FVU Pareto plot"></p></li>
<li><b>Probe</b>: <a href="probe/report.html">report.html</a> (accuracy raw vs SAE, aligned latents,
  ablations, intersections) and <a href="probe/report.json">report.json</a>.</li>
<li><b>Visuals</b>: <a href="visuals/index.html">the latent explorer</a> for {html.escape(best)}.</li>
</ol>
<p>Every step's command line was printed by <code>python -m saev demo</code>; rerun them on your data.</p>
</body></html>
"""
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def _fmt(v: str) -> str:
    try:
        return f"{float(v):.4g}" if "." in v or "e" in v else v
    except ValueError:
        return v
