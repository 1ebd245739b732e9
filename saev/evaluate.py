"""`saev evaluate`: the metrics of DESIGN §6 for trained SAEs on the eval split of their shards.

The metric code (`Metrics`) is streaming and shared with `saev train`, which calls
`evaluate_ckpts` on its own checkpoints at the end, so the numbers a run reports are the
numbers this command gives. Sums are float64 so FVU over millions of tokens does not lose
precision; the split mean is taken over the very tokens scored, and the total variance is
accumulated around a shift (the first batch's mean) to avoid cancellation. L0 quantiles come
from an exact histogram of per-token L0 values, so they equal `numpy.percentile` (linear
interpolation) on the full list of per-token L0s.

Outputs under `--out`: `<member>/evaluation.json` and `<member>/latent_freq.npy` per SAE,
`<member>/freq_hist.png`, and for the whole set `sweep.csv`, `sweep.md` and `pareto.png`.
With `--downstream` (saev.downstream), each evaluation.json also gets a `downstream` object
(what the ViT loses when the SAE replaces its layer), the tables get its columns, and
`pareto_downstream.png` plots L0 against the fraction recovered.
"""

import csv
import dataclasses
import io
import logging
import math
import pathlib
import typing

import numpy as np
import torch
import tyro
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

import saev.nn
from saev.calibration import calibrate_for_shards
from saev.downstream import DownstreamConfig, ImagesConfig
from saev.downstream import evaluate as evaluate_downstream
from saev.errors import UserError
from saev.helpers import atomic_write_bytes, atomic_write_json, atomic_write_text, resolve_device
from saev.shards import Shards, Tokens
from saev.shards.shuffled import ShuffledLoader, split_images

logger = logging.getLogger("saev.evaluate")


class Metrics:
    """Streaming L0, latent frequency, MSE, FVU and cosine for S SAEs on the same tokens."""

    def __init__(self, n_saes: int, d_vit: int, d_sae: int, *, dense_threshold: float = 0.1):
        self.S, self.d_vit, self.d_sae = n_saes, d_vit, d_sae
        self.dense_threshold = dense_threshold
        self.n = 0
        self.shift: Tensor | None = None
        self.sum_dx = torch.zeros(d_vit, dtype=torch.float64)  # sum of (x - shift)
        self.sum_sq_dx = torch.zeros((), dtype=torch.float64)  # sum of ||x - shift||^2
        self.sum_err = torch.zeros(n_saes, dtype=torch.float64)  # sum of ||x - x_hat||^2
        self.sum_cos = torch.zeros(n_saes, dtype=torch.float64)
        self.fired = torch.zeros(n_saes, d_sae, dtype=torch.int64)
        self.l0_hist = torch.zeros(n_saes, d_sae + 1, dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        x: Float[Tensor, "batch d_vit"],
        x_hat: Float[Tensor, "n_saes batch d_vit"],
        f: Float[Tensor, "n_saes batch d_sae"],
    ) -> None:
        x64 = x.detach().to("cpu", torch.float64)
        if self.shift is None:
            self.shift = x64.mean(dim=0)
        dx = x64 - self.shift
        self.sum_dx += dx.sum(dim=0)
        self.sum_sq_dx += (dx * dx).sum()
        self.n += x.shape[0]

        x_hat64 = x_hat.detach().to("cpu", torch.float64)
        err = x64[None] - x_hat64
        self.sum_err += (err * err).sum(dim=(1, 2))
        cos = torch.nn.functional.cosine_similarity(x64[None], x_hat64, dim=-1, eps=1e-12)
        self.sum_cos += cos.sum(dim=1)

        # Counted in float32: exact (integers below 2^24), and float sums over [S, B, d_sae] are
        # several times faster than bool ones on the CPU (this update for 4,096 tokens x 6,144
        # latents: 207 -> 120 ms; the encoder matmul of the same batch takes ~200 ms).
        active = (f.detach() != 0).to(torch.float32)
        self.fired += active.sum(dim=1).to("cpu", torch.int64)
        l0 = active.sum(dim=2).to("cpu", torch.int64)  # [S, batch]
        self.l0_hist.scatter_add_(1, l0, torch.ones_like(l0))

    def total_variance(self) -> float:
        """Sum over tokens of ||x - mean||^2, the FVU denominator."""
        mean_dx = self.sum_dx / self.n
        return float(self.sum_sq_dx - self.n * (mean_dx * mean_dx).sum())

    def result(self) -> list[dict]:
        """One dict of DESIGN §6 metrics per SAE (see docs/evaluate.md for the keys)."""
        if self.n == 0:
            raise ValueError("no tokens were scored")
        total_var = self.total_variance()
        out = []
        for s in range(self.S):
            freq = (self.fired[s].double() / self.n).numpy()
            hist = self.l0_hist[s].numpy()
            values = np.arange(hist.size, dtype=np.float64)
            mean = float((hist * values).sum() / self.n)
            var = float((hist * (values - mean) ** 2).sum() / self.n)
            sum_err = float(self.sum_err[s])
            fvu = sum_err / total_var if total_var > 0 else math.nan
            n_dead = int((freq == 0).sum())
            n_dense = int((freq > self.dense_threshold).sum())
            out.append(
                {
                    "n_tokens": self.n,
                    "d_vit": self.d_vit,
                    "d_sae": self.d_sae,
                    "l0_mean": mean,
                    "l0_median": hist_quantile(hist, 0.5),
                    "l0_std": math.sqrt(var),
                    "l0_p99": hist_quantile(hist, 0.99),
                    "mse": sum_err / self.n,
                    "mse_per_element": sum_err / (self.n * self.d_vit),
                    "fvu": fvu,
                    "explained_variance": 1.0 - fvu,
                    "cosine": float(self.sum_cos[s]) / self.n,
                    "n_dead": n_dead,
                    "dead_frac": n_dead / self.d_sae,
                    "n_dense": n_dense,
                    "dense_frac": n_dense / self.d_sae,
                    "dense_threshold": self.dense_threshold,
                    "freq": freq,
                }
            )
        return out


def hist_quantile(hist: np.ndarray, q: float) -> float:
    """Quantile `q` of the integers whose counts are `hist`, as numpy.percentile (linear) gives it."""
    n = int(hist.sum())
    cum = np.cumsum(hist)
    rank = (n - 1) * q
    lo, hi = math.floor(rank), math.ceil(rank)
    v_lo = float(np.searchsorted(cum, lo, side="right"))
    v_hi = float(np.searchsorted(cum, hi, side="right"))
    return v_lo + (v_hi - v_lo) * (rank - lo)


def log10_freq_hist(freq: np.ndarray, *, bins: int = 50, lo: float = -8.0) -> dict:
    """Histogram of log10 latent frequency over the live latents; dead latents counted apart.

    The range starts at `lo` or lower, so a latent that fired once in a huge split is still binned.
    """
    live = freq[freq > 0]
    if live.size:
        lo = min(lo, math.floor(float(np.log10(live.min()))))
    counts, edges = np.histogram(np.log10(live), bins=bins, range=(lo, 0.0))
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((freq == 0).sum())}


# Finding and scoring checkpoints.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which activations to score on (by default, what each checkpoint was trained on)."""

    shard_root: pathlib.Path | None = None
    """Shard directory; default: the shard_root recorded in each checkpoint."""
    layer: int | None = None
    """Layer for checkpoints that do not record one (reference saev 0.1 sae.pt)."""
    tokens: Tokens | None = None
    """Token selection for checkpoints that do not record one."""
    batch_size: int = 4096
    """Tokens per batch."""
    n_tokens: int = 1_000_000
    """Score at most this many eval-split tokens (the first ones in image order; 0 = all)."""
    n_threads: int = 4
    """Reader threads."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Score trained SAEs on the eval split of their shards: L0, frequencies, MSE, FVU, cosine."""

    ckpt: tuple[pathlib.Path, ...]
    """Checkpoint directories, sae.pt files, or run directories of `saev train` (all members)."""
    data: DataConfig = DataConfig()
    out: pathlib.Path = pathlib.Path("evaluation")
    """Output directory: per-SAE evaluation.json, sweep.csv/md, pareto.png, frequency histograms."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    downstream: bool = False
    """Also splice each SAE into the recording's ViT on held-out images: output cosine, KL, top-1 agreement, fraction recovered vs mean-ablation (docs/evaluate.md)."""
    downstream_cfg: typing.Annotated[DownstreamConfig, tyro.conf.arg(name="downstream")] = (
        DownstreamConfig()
    )
    images: ImagesConfig = ImagesConfig()


def find_ckpts(path: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(name, checkpoint path) of every SAE under `path` (a checkpoint or a run directory)."""
    path = pathlib.Path(path)
    if path.is_file():
        if path.name in ("config.json", "sae.safetensors"):
            return [(path.parent.name, path.parent)]
        return [(path.stem if path.name != "sae.pt" else path.parent.name, path)]
    if not path.is_dir():
        raise UserError(f"--ckpt {path}: no such file or directory.")
    if (path / "config.json").is_file():
        return [(path.name, path)]
    if (path / "sae.pt").is_file():
        return [(path.name, path / "sae.pt")]
    base = path / "members" if (path / "members").is_dir() else path
    found = sorted(d for d in base.iterdir() if (d / "config.json").is_file())
    if not found:
        raise UserError(
            f"--ckpt {path}: no checkpoint here (expected config.json + sae.safetensors, a sae.pt, "
            "or a `saev train` run directory with members/)."
        )
    return [(d.name, d) for d in found]


def evaluate_ckpts(
    ckpts: list[tuple[str, pathlib.Path]],
    *,
    data: DataConfig = DataConfig(),
    dense_threshold: float = 0.1,
    device: str | torch.device = "cpu",
    downstream: DownstreamConfig | None = None,
    images_root: pathlib.Path | None = None,
) -> list[dict]:
    """Score each checkpoint on its eval split; SAEs that share shards, layer, tokens and split
    are fed the same batches, read once. With `downstream`, also splice them into the ViT
    (one clean and one floor pass per group; images under `images_root` if given)."""
    device = torch.device(device)
    groups: dict[tuple, list[tuple[str, pathlib.Path, object]]] = {}
    for name, path in ckpts:
        sae = saev.nn.load(path)
        cfg = sae.cfg
        root = data.shard_root or cfg.get("shard_root")
        layer = sae.layer if sae.layer is not None else data.layer
        tokens = sae.tokens if sae.tokens is not None else data.tokens
        if root is None:
            raise UserError(f"{path}: records no shard directory; pass --data.shard-root.")
        if layer is None or tokens is None:
            raise UserError(
                f"{path}: records no layer/tokens; pass --data.layer and --data.tokens."
            )
        split = cfg.get("split") or {}
        key = (str(root), int(layer), str(tokens), split.get("eval_frac"), split.get("seed"))
        groups.setdefault(key, []).append((name, pathlib.Path(path), sae))

    results = []
    for (root, layer, tokens, eval_frac, split_seed), members in groups.items():
        shards = Shards(root)
        for _, path, sae in members:
            if sae.d_vit != shards.md.d_vit:
                raise UserError(
                    f"{path}: SAE d_vit={sae.d_vit} but {root} holds d_vit={shards.md.d_vit}."
                )
            calibrate_for_shards(sae, shards, layer, tokens)
        if not eval_frac:  # None (saev 0.1, no split) or 0.0 (trained with --data.eval-frac 0)
            logger.warning("%s: no held-out split recorded; scoring on all images.", root)
            imgs, split_name = np.arange(shards.n_imgs), "all"
            train_imgs = imgs
        else:
            train_imgs, imgs = split_images(shards.n_imgs, eval_frac, split_seed)
            split_name = "eval"
            if imgs.size == 0:
                raise UserError(f"{root}: the eval split is empty (eval_frac={eval_frac}).")
        loader = ShuffledLoader(
            shards,
            layer=layer,
            tokens=tokens,
            batch_size=data.batch_size,
            imgs=imgs,
            shuffle=False,
            n_threads=data.n_threads,
        )
        saes = [sae.to(device).eval() for _, _, sae in members]
        metrics = [
            Metrics(1, sae.d_vit, sae.d_sae, dense_threshold=dense_threshold) for sae in saes
        ]
        budget = data.n_tokens or loader.n_tokens
        seen = 0
        bar = tqdm(total=min(budget, loader.n_tokens), unit="tok", unit_scale=True, desc="evaluate")
        with torch.no_grad():
            for x in loader.batches(n_epochs=1):
                x = x[: budget - seen].to(device)
                for sae, m in zip(saes, metrics, strict=True):
                    f = sae.encode(x)
                    m.update(x, sae.decode(f)[None], f[None])
                seen += x.shape[0]
                bar.update(x.shape[0])
                if seen >= budget:
                    break
        bar.close()
        extra: list[dict] = [{} for _ in members]
        if downstream is not None:
            docs = evaluate_downstream(
                saes,
                shards,
                layer,
                tokens,
                eval_imgs=imgs,
                mean_imgs=train_imgs,
                cfg=downstream,
                images_root=images_root,
                device=device,
            )
            extra = [{"downstream": {"split": split_name, **doc}} for doc in docs]
        for (name, path, sae), m, more in zip(members, metrics, extra, strict=True):
            (res,) = m.result()
            results.append(
                {
                    "name": name,
                    "ckpt": str(path),
                    "family": sae.cfg.get("family"),
                    "shard_root": root,
                    "layer": layer,
                    "tokens": tokens,
                    "split": split_name,
                    **res,
                    **more,
                }
            )
    return results


# Writing results.

TABLE_COLUMNS = (
    "name",
    "family",
    "d_sae",
    "l0_mean",
    "fvu",
    "explained_variance",
    "mse",
    "cosine",
    "dead_frac",
    "dense_frac",
    "n_tokens",
)

DOWNSTREAM_COLUMNS = {
    "downstream_cosine": "cosine",
    "downstream_kl": "kl",
    "top1_agreement": "top1_agreement",
    "recovered_kl": "recovered_kl",
    "recovered_cosine": "recovered_cosine",
}
"""Table column -> key of the `downstream` object; added when any SAE has one."""


def table_columns(results: list[dict]) -> tuple[str, ...]:
    if any("downstream" in r for r in results):
        return TABLE_COLUMNS + tuple(DOWNSTREAM_COLUMNS)
    return TABLE_COLUMNS


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        row = {c: r.get(c) for c in TABLE_COLUMNS}
        if "downstream" in r:
            row.update({c: r["downstream"].get(k) for c, k in DOWNSTREAM_COLUMNS.items()})
        rows.append({c: row.get(c) for c in table_columns(results)})
    return rows


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(results: list[dict]) -> str:
    rows, cols = table_rows(results), table_columns(results)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict], out: pathlib.Path) -> None:
    """evaluation.json, latent_freq.npy and freq_hist.png per SAE; sweep.csv/md and pareto.png
    (and pareto_downstream.png when the SAEs were spliced into the ViT)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        d = out / r["name"]
        freq = r["freq"]
        doc = {k: v for k, v in r.items() if k != "freq"}
        doc["log10_freq_hist"] = log10_freq_hist(freq)
        atomic_write_json(d / "evaluation.json", doc)
        buf = io.BytesIO()
        np.save(buf, freq)
        atomic_write_bytes(d / "latent_freq.npy", buf.getvalue())
        atomic_write_bytes(d / "freq_hist.png", freq_hist_png(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=table_columns(results), lineterminator="\n")
    w.writeheader()
    w.writerows(table_rows(results))
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    atomic_write_text(out / "sweep.md", markdown_table(results))
    atomic_write_bytes(out / "pareto.png", pareto_png(results))
    if any("downstream" in r for r in results):
        atomic_write_bytes(out / "pareto_downstream.png", pareto_downstream_png(results))


def pareto_front(points: list[tuple[float, float]], *, maximise: bool = False) -> list[int]:
    """Indices of the points not dominated in (lower L0, lower y), sorted by L0; with
    `maximise`, in (lower L0, higher y)."""
    sign = -1.0 if maximise else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], math.inf
    for i in order:
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _l0_plot(points: list[tuple[dict, float]], *, ylabel: str, title: str, maximise: bool) -> bytes:
    """L0 (mean) vs a score, one labelled point per SAE, coloured by family, frontier drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ok = [(r, y) for r, y in points if math.isfinite(y) and math.isfinite(r["l0_mean"])]
    families = sorted({str(r["family"]) for r, _ in ok})
    for j, fam in enumerate(families):
        pts = [(r["l0_mean"], y) for r, y in ok if str(r["family"]) == fam]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], label=fam, color=f"C{j}")
    for r, y in ok:
        ax.annotate(
            r["name"], (r["l0_mean"], y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    front = pareto_front([(r["l0_mean"], y) for r, y in ok], maximise=maximise)
    if len(front) > 1:
        ax.plot(
            [ok[i][0]["l0_mean"] for i in front],
            [ok[i][1] for i in front],
            "k--",
            lw=0.8,
            label="Pareto front",
        )
    if ok and min(r["l0_mean"] for r, _ in ok) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({len(ok)} SAEs)")
    if families:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto_png(results: list[dict]) -> bytes:
    """L0 (mean) vs FVU, one labelled point per SAE, coloured by family, Pareto front drawn."""
    return _l0_plot(
        [(r, r["fvu"]) for r in results],
        ylabel="FVU (fraction of variance unexplained)",
        title="L0 vs FVU on the eval split",
        maximise=False,
    )


def pareto_downstream_png(results: list[dict]) -> bytes:
    """L0 (mean) vs the fraction recovered when the SAE replaces its layer: of the KL when every
    spliced model has a classifier, else of 1 - cosine of the image embeddings."""
    ds = [r for r in results if "downstream" in r]
    key = "recovered_kl" if all(r["downstream"]["has_head"] for r in ds) else "recovered_cosine"
    what = "KL of the logits" if key == "recovered_kl" else "1 - cosine of the embeddings"
    points = [(r, r["downstream"][key]) for r in ds]
    return _l0_plot(
        [(r, math.nan if y is None else y) for r, y in points],
        ylabel=f"fraction recovered ({what}; 1 = clean, 0 = mean-ablated)",
        title="L0 vs downstream fraction recovered",
        maximise=True,
    )


def freq_hist_png(r: dict) -> bytes:
    """Histogram of log10 latent frequency of one SAE; dead latents in the title."""
    from matplotlib.figure import Figure

    h = log10_freq_hist(r["freq"])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    edges = np.array(h["edges"])
    ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge")
    ax.axvline(
        math.log10(r["dense_threshold"]), color="r", ls="--", lw=0.8, label="dense threshold"
    )
    ax.set_xlabel("log10 latent frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{r['name']}: {h['n_dead']} dead of {r['d_sae']}", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def main(cfg: Config) -> None:
    if not cfg.downstream and (
        cfg.downstream_cfg != DownstreamConfig() or cfg.images != ImagesConfig()
    ):
        raise UserError(
            "--downstream.* and --images.root only apply with --downstream; add --downstream."
        )
    ckpts = [c for path in cfg.ckpt for c in find_ckpts(path)]
    names = [n for n, _ in ckpts]
    if len(set(names)) != len(names):
        # Same member names from different runs: prefix the parent directory.
        ckpts = [(f"{p.parent.parent.name}-{n}" if names.count(n) > 1 else n, p) for n, p in ckpts]
    results = evaluate_ckpts(
        ckpts,
        data=cfg.data,
        dense_threshold=cfg.dense_threshold,
        device=resolve_device(cfg.device),
        downstream=cfg.downstream_cfg if cfg.downstream else None,
        images_root=cfg.images.root,
    )
    write_outputs(results, cfg.out)
    print(markdown_table(results), end="")
    plots = "pareto.png and pareto_downstream.png" if cfg.downstream else "pareto.png"
    print(f"wrote {len(results)} evaluation(s), sweep.csv, sweep.md and {plots} to {cfg.out}")
