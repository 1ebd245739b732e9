"""`python -m saev probe`: linear probes, latent alignment, ablations and an intersectional
report for the labels of a shard directory's image index.

Reads the shards (and optionally one SAE checkpoint), builds pooled per-image representations
once (cached in OUT/reps), fits a probe per representation x attribute on the train split,
scores it on the held-out split, and for SAE representations ranks latents by alignment with
each attribute and ablates the top ones. Writes OUT/report.json, OUT/report.html and its
PNGs. See docs/probe.md.
"""

import dataclasses
import logging
import os
import pathlib
import re
import typing

import numpy as np
import torch

import saev.nn
from saev.calibration import calibrate_for_shards
from saev.errors import UserError
from saev.helpers import resolve_device
from saev.nn import SAE
from saev.probe import ablate, align, intersect, report, reps, schema, split
from saev.probe import fit as fitting
from saev.recorded import image_index
from saev.shards import Shards

logger = logging.getLogger("saev.probe")


@dataclasses.dataclass(frozen=True)
class Data:
    """Where the activations are."""

    shard_root: pathlib.Path
    """Shard directory written by `saev activations` (metadata.json, images.csv, acts*.bin)."""


@dataclasses.dataclass(frozen=True)
class Images:
    """Where the images are (only needed for saev 0.1 shards, which keep no image index)."""

    root: pathlib.Path | None = None
    """saev 0.1 shards of an image folder: that folder; their image index and `class` labels are rebuilt from it in ImageFolder order, as 0.1 recorded them."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Probe image attributes in a ViT's activations and in an SAE's latents."""

    data: Data
    out: pathlib.Path
    """Output directory: report.json, report.html, PNGs, and the representation cache."""
    ckpt: pathlib.Path | None = None
    """SAE checkpoint directory (or sae.safetensors, a saev 0.1 sae.pt or its run directory); omit for raw ViT only."""
    attributes: tuple[str, ...] = ("age", "gender", "race")
    """Label columns of the image index to probe (FairFace: age gender race)."""
    pool: tuple[typing.Literal["mean", "max"], ...] = ("mean", "max")
    """How SAE codes are pooled over an image's tokens."""
    raw_token: tuple[typing.Literal["cls", "mean"], ...] = ("cls", "mean")
    """Raw ViT representations: the CLS token and/or the mean of the patch tokens."""
    layer: int | None = None
    """Recorded layer to probe; default: the checkpoint's layer, else the last recorded layer."""
    split_by: split.SplitBy = "auto"
    """Held-out split: official (the dataset's own val split), random (seeded, stratified), or auto (official when the index has one)."""
    test_frac: float = 0.2
    """Held-out fraction of each stratum for the random split."""
    val_frac: float = 0.2
    """Fraction of the train split used as the validation fold that picks the L2 strength."""
    lams: tuple[float, ...] = fitting.LAMS
    """L2 strengths tried (mean cross-entropy + lam/2 * ||W||^2 on standardised features)."""
    max_iter: int = 200
    """L-BFGS iterations per fit."""
    top_k: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
    """Numbers of top aligned latents to ablate, for the ablations and TPP (clipped to the SAE's width)."""
    top_latents: int = 10
    """Latents listed per class and per intersectional cell."""
    crosses: tuple[str, ...] = ()
    """Intersections to report, each as comma-joined attributes (e.g. gender,race); default: the last two attributes, and all of them when there are three or more."""
    min_cell_images: int = intersect.MIN_CELL
    """Cells with fewer held-out images are listed but left out of worst-group accuracy and gaps; firing departures (computed over all labelled images) skip cells with fewer images in all."""
    visuals: pathlib.Path | None = None
    """Output folder of `saev visuals` for the same SAE; latent ids then link to its latents/<id>.html."""
    batch_size: int = 64
    """Images per batch when building representations."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """Seed of the random split and of the validation fold."""
    images: Images = Images()


def natural_key(s: str):
    """Sort '3-9' before '10-19': digits compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    classes: list[str]
    y: np.ndarray
    """Class index of every image, -1 where the label is missing."""
    n_missing: int


def read_attributes(shards: Shards, index, names: tuple[str, ...]) -> dict[str, Attribute]:
    """The label columns `names` of `index` (images.csv, or one rebuilt for saev 0.1 shards)."""
    missing = [a for a in names if a not in index.label_names]
    if missing:
        raise UserError(
            f"{index.file}: no label column {', '.join(map(repr, missing))}; "
            f"available: {', '.join(index.label_names) or '(none)'}."
        )
    if len(index) != shards.n_imgs:
        raise UserError(
            f"{index.file}: {len(index)} rows but the shards hold {shards.n_imgs} images."
        )
    out = {}
    for a in names:
        vals = [v.strip() for v in index.labels(a)]
        classes = sorted({v for v in vals if v}, key=natural_key)
        pos = {c: i for i, c in enumerate(classes)}
        y = np.array([pos.get(v, -1) for v in vals], dtype=np.int64)
        out[a] = Attribute(a, classes, y, int((y < 0).sum()))
    return out


def check_counts(attr: Attribute, test: np.ndarray) -> None:
    for side, mask in (("train", ~test), ("held-out", test)):
        counts = np.bincount(attr.y[mask & (attr.y >= 0)], minlength=len(attr.classes))
        for c, k in zip(attr.classes, counts, strict=True):
            if k < 2:
                raise UserError(
                    f"attribute {attr.name!r}: class {c!r} has {k} image(s) in the {side} split; "
                    "every class needs at least 2 on each side (merge or drop it in images.csv, "
                    "or change --split-by/--test-frac)."
                )
    if len(attr.classes) < 2:
        raise UserError(
            f"attribute {attr.name!r} has {len(attr.classes)} class(es) {attr.classes}; "
            "a probe needs at least 2."
        )


def load_sae(cfg: Config, shards: Shards) -> tuple[SAE, int]:
    """The checkpoint's SAE, checked against the shards; returns (sae, layer)."""
    sae = saev.nn.load(cfg.ckpt)
    md = shards.md
    if sae.d_vit != md.d_vit:
        raise UserError(
            f"{cfg.ckpt}: SAE d_vit={sae.d_vit} but the shards in {shards.root} have "
            f"d_vit={md.d_vit}; use the shards the SAE was trained on."
        )
    trained_on = (sae.cfg.get("shards") or {}).get("vit_ckpt")
    if trained_on is not None and trained_on != md.vit_ckpt:
        raise UserError(
            f"{cfg.ckpt}: SAE was trained on activations of {trained_on!r} but the shards in "
            f"{shards.root} are from {md.vit_ckpt!r}."
        )
    layer = sae.layer
    if layer is None:
        layer = cfg.layer if cfg.layer is not None else md.layers[-1]
    elif md.resolve_layer(layer) not in md.layers:
        raise UserError(
            f"{cfg.ckpt}: SAE was trained on layer {layer} but {shards.root} recorded layers "
            f"{md.layers}."
        )
    if cfg.layer is not None and md.resolve_layer(cfg.layer) != md.resolve_layer(layer):
        raise UserError(
            f"--layer {cfg.layer} does not match the checkpoint's layer {layer} ({cfg.ckpt})."
        )
    layer = md.resolve_layer(layer)
    calibrate_for_shards(sae, shards, layer, "patches")
    return sae, layer


def parse_crosses(cfg: Config) -> list[tuple[str, ...]]:
    if not cfg.crosses:
        return intersect.default_crosses(list(cfg.attributes))
    out = []
    for spec in cfg.crosses:
        cross = tuple(a.strip() for a in spec.split(",") if a.strip())
        unknown = [a for a in cross if a not in cfg.attributes]
        if len(cross) < 2 or unknown:
            raise UserError(
                f"--crosses {spec!r}: expected two or more of --attributes "
                f"({', '.join(cfg.attributes)}) joined by commas."
            )
        out.append(cross)
    return out


def check_config(cfg: Config) -> None:
    """UserError for a flag value no run could use, before anything is read or written."""
    if not cfg.attributes:
        raise UserError("--attributes is empty; name at least one label column.")
    if not cfg.lams or min(cfg.lams) <= 0:
        raise UserError(f"--lams {list(cfg.lams)}: expected one or more L2 strengths > 0.")
    counts = {
        "--max-iter": [cfg.max_iter],
        "--batch-size": [cfg.batch_size],
        "--top-latents": [cfg.top_latents],
        "--min-cell-images": [cfg.min_cell_images],
        "--top-k": list(cfg.top_k),
    }
    for flag, values in counts.items():
        if any(v < 1 for v in values):
            raise UserError(f"{flag} {' '.join(map(str, values))}: expected whole numbers >= 1.")
    if not 0 < cfg.val_frac < 1:
        raise UserError(f"--val-frac {cfg.val_frac}; expected a fraction in (0, 1).")


def main(cfg: Config) -> None:
    check_config(cfg)
    device = resolve_device(cfg.device)
    shards = Shards(cfg.data.shard_root)
    index = image_index(shards, cfg.images.root)
    attrs = read_attributes(shards, index, cfg.attributes)
    crosses = parse_crosses(cfg)
    sae, layer = load_sae(cfg, shards) if cfg.ckpt is not None else (None, raw_layer(cfg, shards))
    warn_unrendered_visuals(cfg)
    test, split_desc = split_held_out(cfg, index, attrs)
    names = representation_names(cfg, sae)
    reps.check(shards, names)
    # Every check is done: from here on the run writes into OUT.
    cfg.out.mkdir(parents=True, exist_ok=True)
    status = reps.build(
        cfg.out,
        shards,
        layer,
        names,
        sae=sae,
        ckpt_print=reps.ckpt_fingerprint(cfg.ckpt) if cfg.ckpt is not None else None,
        batch_size=cfg.batch_size,
        device=device,
    )
    doc = new_report(cfg, shards, layer, sae, attrs, test, split_desc)
    for a in attrs.values():
        if a.n_missing:
            print(f"{a.name}: {a.n_missing} image(s) without a label were dropped.")

    labels = {
        a: np.array([v.strip() for v in index.labels(a)], dtype=object) for a in cfg.attributes
    }
    correct, departures = probe_all(cfg, doc, names, status, attrs, test, labels, crosses, device)
    doc["intersections"] = [
        intersect_cells(cfg, cross, names, attrs, labels, test, correct, departures.get(cross))
        for cross in crosses
    ]
    doc["latents_of_interest"] = latents_of_interest(doc)
    report.write(cfg.out, doc)
    print(
        f"split: {split_desc}; {doc['split']['n_train']} train / {doc['split']['n_test']} held out."
    )
    print(f"wrote {cfg.out / 'report.json'} and {cfg.out / 'report.html'}")


# Before anything is written


def raw_layer(cfg: Config, shards: Shards) -> int:
    """The layer to probe without a checkpoint: --layer, else the last recorded one."""
    md = shards.md
    layer = md.layers[-1] if cfg.layer is None else md.resolve_layer(cfg.layer)
    shards.layer_pos(layer)  # UserError listing the recorded layers
    return layer


def warn_unrendered_visuals(cfg: Config) -> None:
    if cfg.visuals is not None and not (cfg.visuals / "latents").is_dir():
        logger.warning(
            "%s has no latents/ folder yet; latent links work once `saev visuals --out %s` "
            "renders them (pass report.json's latents_of_interest to --include-latents).",
            cfg.visuals,
            cfg.visuals,
        )


def split_held_out(cfg: Config, index, attrs: dict[str, Attribute]) -> tuple[np.ndarray, str]:
    """The held-out mask over images (True = held out) and the split in words; UserError when
    a class would be missing from either side. `index`: the image index (images.csv, or one
    rebuilt for saev 0.1 shards)."""
    test, split_desc = split.make_split(
        cfg.split_by,
        paths=index.paths(),
        split_col=index.labels("split") if "split" in index.label_names else None,
        strata=list(zip(*(index.labels(a) for a in cfg.attributes), strict=True)),
        test_frac=cfg.test_frac,
        seed=cfg.seed,
        source=str(index.file),
    )
    for a in attrs.values():
        check_counts(a, test)
    return test, split_desc


def representation_names(cfg: Config, sae: SAE | None) -> list[str]:
    """The raw ViT representations asked for, then the SAE's pooled codes."""
    names = [reps.RAW[t] for t in dict.fromkeys(cfg.raw_token)]
    if sae is not None:
        names += [reps.SAE[p] for p in dict.fromkeys(cfg.pool)]
    if not names:
        raise UserError("nothing to probe: --raw-token is empty and no --ckpt was given.")
    return names


def new_report(
    cfg: Config,
    shards: Shards,
    layer: int,
    sae: SAE | None,
    attrs: dict[str, Attribute],
    test: np.ndarray,
    split_desc: str,
) -> schema.Report:
    """The report's header, with its per-representation sections still empty."""
    md = shards.md
    return {
        "shard_root": str(shards.root),
        "ckpt": None if cfg.ckpt is None else str(cfg.ckpt),
        "layer": layer,
        "vit": {"family": md.vit_family, "ckpt": md.vit_ckpt, "pretrained": md.pretrained},
        "sae": None
        if sae is None
        else {
            "d_sae": sae.d_sae,
            "tokens": sae.tokens,
            "pooled_over": reps.sae_pool_tokens(sae),
        },
        "split": {"how": split_desc, "n_train": int((~test).sum()), "n_test": int(test.sum())},
        "attributes": {a.name: describe(a, test) for a in attrs.values()},
        "representations": {},
        "probes": {},
        "alignment": {},
        "ablations": {},
        "tpp": {},
        "intersections": [],
        "visuals": None if cfg.visuals is None else os.path.relpath(cfg.visuals, cfg.out),
        "config": dataclasses.asdict(cfg),
    }


def describe(a: Attribute, test: np.ndarray) -> schema.AttributeInfo:
    """Class names and counts of one attribute, and the majority-class held-out accuracy."""
    train_y = a.y[~test & (a.y >= 0)]
    test_y = a.y[test & (a.y >= 0)]
    majority = np.bincount(train_y, minlength=len(a.classes)).argmax()
    return {
        "classes": a.classes,
        "n_missing": a.n_missing,
        "n_train": len(train_y),
        "n_test": len(test_y),
        "train_counts": np.bincount(train_y, minlength=len(a.classes)).tolist(),
        "test_counts": np.bincount(test_y, minlength=len(a.classes)).tolist(),
        "chance": float(np.mean(test_y == majority)),
    }


# Probe, align, ablate


def probe_all(
    cfg: Config,
    doc: schema.Report,
    names: list[str],
    status: dict[str, str],
    attrs: dict[str, Attribute],
    test: np.ndarray,
    labels: dict[str, np.ndarray],
    crosses: list[tuple[str, ...]],
    device: torch.device,
) -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, ...], intersect.Departures]]:
    """Every representation in turn, loaded once: its probes (and alignment and ablations)
    into `doc`, and while the SAE codes are in memory, the cells' firing departures.

    Returns which held-out images each (representation, attribute) probe gets right, and the
    departures per cross."""
    correct: dict[tuple[str, str], np.ndarray] = {}
    fires_from = next((n for n in ("sae-max", "sae-mean") if n in names), None)
    departures: dict[tuple[str, ...], intersect.Departures] = {}
    for name in names:
        x = reps.load(cfg.out, name, device)
        doc["representations"][name] = {"dim": x.shape[1], "cache": status[name]}
        probe_representation(cfg, doc, name, x, attrs, test, correct)
        if name == fires_from:
            fires = x > 0
            for cross in crosses:
                departures[cross] = intersect.departures(
                    fires, labels, cross, min_n=cfg.min_cell_images, top=cfg.top_latents
                )
            del fires
        del x
    return correct, departures


@dataclasses.dataclass(frozen=True)
class Rows:
    """One attribute's rows of the representation matrix."""

    train: np.ndarray
    """Labelled train-split rows."""
    test: np.ndarray
    """Labelled held-out rows."""
    y_train: torch.Tensor
    """Every row's class, -1 outside the train split (how the fits tell the rows apart)."""
    y_test: np.ndarray
    """The classes of `test`."""

    @classmethod
    def of(cls, a: Attribute, test: np.ndarray, device: torch.device) -> "Rows":
        test_rows = np.flatnonzero(test & (a.y >= 0))
        return cls(
            train=np.flatnonzero(~test & (a.y >= 0)),
            test=test_rows,
            y_train=torch.as_tensor(np.where(~test, a.y, -1), device=device),
            y_test=a.y[test_rows],
        )


def probe_representation(
    cfg: Config,
    doc: schema.Report,
    name: str,
    x: torch.Tensor,
    attrs: dict[str, Attribute],
    test: np.ndarray,
    correct: dict[tuple[str, str], np.ndarray],
) -> None:
    """Probe every attribute in one representation, into `doc`; for SAE codes also align the
    latents, ablate the top ones and score targeted ablation across attributes. `correct`
    receives which held-out images each probe gets right (for the intersections)."""
    probes, tests, rankings = {}, {}, {}
    for a in attrs.values():
        rows = Rows.of(a, test, x.device)
        probe = fit_probe(cfg, doc, name, x, a, rows, correct)
        if not name.startswith("sae-"):
            continue
        ranking = align_latents(cfg, doc, name, x, a, rows)
        ablate_latents(cfg, doc, name, x, a, rows, probe, ranking)
        probes[a.name], tests[a.name], rankings[a.name] = probe, (rows.test, rows.y_test), ranking
    if len(probes) >= 2:
        doc["tpp"][name] = ablate.tpp(x, probes, tests, rankings, cfg.top_k)


def fit_probe(
    cfg: Config,
    doc: schema.Report,
    name: str,
    x: torch.Tensor,
    a: Attribute,
    rows: Rows,
    correct: dict[tuple[str, str], np.ndarray],
) -> fitting.Probe:
    """Fit the probe of `a` on the train split, score it on the held-out one, into `doc`."""
    probe, sel = fitting.fit_cv(
        x,
        rows.y_train,
        len(a.classes),
        lams=cfg.lams,
        val_frac=cfg.val_frac,
        seed=cfg.seed,
        max_iter=cfg.max_iter,
    )
    scores = fitting.evaluate(probe, x, rows.test, rows.y_test)
    pred = probe.predict(x, torch.as_tensor(rows.test, device=x.device)).cpu().numpy()
    ok = np.zeros(len(a.y), dtype=bool)
    ok[rows.test] = pred == rows.y_test
    correct[(name, a.name)] = ok
    doc["probes"].setdefault(name, {})[a.name] = {
        **scores,
        "lam": sel.best,
        "selection": dataclasses.asdict(sel),
    }
    print(f"{name:>9} {a.name:>12}: accuracy {scores['accuracy']:.3f} (lam={sel.best:g})")
    return probe


def align_latents(
    cfg: Config, doc: schema.Report, name: str, x: torch.Tensor, a: Attribute, rows: Rows
) -> np.ndarray:
    """Rank the latents by their alignment with `a`'s classes on the train split, into `doc`
    (and the full matrices into OUT/alignment); returns the ranking, most aligned first."""
    al = align.align(
        x,
        torch.as_tensor(a.y[rows.train], device=x.device),
        len(a.classes),
        rows=torch.as_tensor(rows.train, device=x.device),
    )
    doc["alignment"].setdefault(name, {})[a.name] = report.save_alignment(
        cfg.out, name, a.name, a.classes, al, cfg.top_latents
    )
    return al.ranking()


def ablate_latents(
    cfg: Config,
    doc: schema.Report,
    name: str,
    x: torch.Tensor,
    a: Attribute,
    rows: Rows,
    probe: fitting.Probe,
    ranking: np.ndarray,
) -> None:
    """The ablations of `a`'s top aligned latents, into `doc`."""
    doc["ablations"].setdefault(name, {})[a.name] = ablate.ablate(
        x,
        rows.y_train,
        rows.test,
        rows.y_test,
        probe,
        ranking,
        cfg.top_k,
        lams=cfg.lams,
        val_frac=cfg.val_frac,
        seed=cfg.seed,
        max_iter=cfg.max_iter,
        desc=f"ablations {name} {a.name}",
    )


# Intersect


def intersect_cells(
    cfg: Config,
    cross: tuple[str, ...],
    names: list[str],
    attrs: dict[str, Attribute],
    labels: dict[str, np.ndarray],
    test: np.ndarray,
    correct: dict[tuple[str, str], np.ndarray],
    found: intersect.Departures | None,
) -> schema.Intersection:
    """Every probe's held-out accuracy per cell of `cross`, and the cells' firing departures."""
    held_out = {a: np.where(test, labels[a], "") for a in cross}
    keys, ids = intersect.cell_ids(held_out, cross)
    acc = {
        a: {
            name: intersect.cell_accuracy(
                keys,
                np.where(attrs[a].y >= 0, ids, -1),
                correct[(name, a)],
                cross,
                cfg.min_cell_images,
            )
            for name in names
        }
        for a in cfg.attributes
    }
    return {
        "cross": list(cross),
        "accuracy": acc,
        "departures": [] if found is None else found.cells,
        "departure_fit": None if found is None else found.fit,
    }


def latents_of_interest(doc: schema.Report) -> list[int]:
    """Every latent the report lists: what `saev visuals --include-latents` should render
    so each latent link has a page."""
    return sorted(
        {
            r["latent"]
            for by_attr in doc["alignment"].values()
            for info in by_attr.values()
            for rows in info["top"].values()
            for r in rows
        }
    )
