"""report.json, the PNG plots and report.html of `saev probe`.

The JSON holds every number (docs/probe.md explains each); the full latent x class alignment matrices go to
`alignment/<rep>__<attribute>.npz` (arrays mean, mean_rest, rate, auroc, selectivity, each
`[d_sae, n_classes]`, plus `classes`) because at 24K latents they would swamp the JSON. The
page is static HTML (no scripts) with matplotlib PNGs next to it; latent ids link to
`<visuals>/latents/<id>.html` when a visuals folder was given.
"""

import html
import io
import pathlib
import re

import numpy as np
from matplotlib.figure import Figure

from saev.helpers import atomic_write_bytes, atomic_write_json, atomic_write_text
from saev.probe.align import Alignment
from saev.probe.schema import AlignmentSummary, CellAccuracy, Intersection, Plots, Report, Tpp


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def save_alignment(
    out: pathlib.Path, rep: str, attr: str, classes: list[str], al: Alignment, top: int
) -> AlignmentSummary:
    """Write the full matrices; return the JSON summary: the top latents per class and the
    overall ranking used by the ablations (first 100)."""
    rel = f"alignment/{slug(rep)}__{slug(attr)}.npz"
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        mean=al.mean,
        mean_rest=al.mean_rest,
        rate=al.rate,
        auroc=al.auroc,
        selectivity=al.selectivity,
        classes=np.array(classes),
    )
    atomic_write_bytes(out / rel, buf.getvalue())
    per_class = {}
    for c, name in enumerate(classes):
        per_class[name] = [
            {
                "latent": int(i),
                "auroc": float(al.auroc[i, c]),
                "selectivity": float(al.selectivity[i, c]),
                "rate": float(al.rate[i, c]),
                "mean": float(al.mean[i, c]),
                "mean_rest": float(al.mean_rest[i, c]),
            }
            for i in al.top(c, top)
        ]
    ranking = al.ranking()[:100]
    score = al.score()
    return {
        "file": rel,
        "top": per_class,
        "ranking": [{"latent": int(i), "score": float(score[i])} for i in ranking],
    }


def write(out: pathlib.Path, doc: Report) -> None:
    """report.json, the PNGs and report.html."""
    doc = doc.copy()
    doc["plots"] = plots(out, doc)
    atomic_write_json(out / "report.json", doc)
    atomic_write_text(out / "report.html", page(doc))


# Plots


def _save(fig: Figure, out: pathlib.Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(out / name, buf.getvalue())
    return name


def plots(out: pathlib.Path, doc: Report) -> Plots:
    """Every PNG of the page, written under `out`; returns their file names."""
    made: Plots = {"accuracy": None, "ablations": {}, "tpp": {}, "cells": []}
    if doc["probes"]:
        made["accuracy"] = _save(accuracy_bars(doc), out, "accuracy.png")
    for a in doc["attributes"]:
        if any(a in by_attr for by_attr in doc["ablations"].values()):
            made["ablations"][a] = _save(ablation_curves(doc, a), out, f"ablation_{slug(a)}.png")
    for rep, t in doc["tpp"].items():
        made["tpp"][rep] = _save(tpp_heatmaps(t, rep), out, f"tpp_{slug(rep)}.png")
    for inter in doc["intersections"]:
        cross = inter["cross"]
        for a, by_rep in inter["accuracy"].items():
            name = f"cells_{slug('x'.join(cross))}_{slug(a)}.png"
            made["cells"].append({"cross": cross, "attribute": a, "file": name})
            _save(heatmaps(cross, a, by_rep), out, name)
    return made


def accuracy_bars(doc: Report) -> Figure:
    """Held-out accuracy per attribute, one bar per representation, majority class dashed."""
    attrs = list(doc["attributes"])
    reps = list(doc["probes"])
    fig = Figure(figsize=(1.6 + 1.4 * len(attrs) * max(1, len(reps)) / 2, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(reps)
    for j, rep in enumerate(reps):
        accs = [doc["probes"][rep][a]["accuracy"] for a in attrs]
        ax.bar(np.arange(len(attrs)) + (j - (len(reps) - 1) / 2) * width, accs, width, label=rep)
    for i, a in enumerate(attrs):
        chance = doc["attributes"][a]["chance"]
        ax.hlines(chance, i - 0.45, i + 0.45, colors="k", linestyles="dashed", lw=1)
    ax.set_xticks(np.arange(len(attrs)), attrs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Probe accuracy (dashed: majority class)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def ablation_curves(doc: Report, a: str) -> Figure:
    """Accuracy against k for each ablation of `a`'s top latents, one panel per representation."""
    sae_reps = [r for r in doc["ablations"] if a in doc["ablations"][r]]
    fig = Figure(figsize=(4.2 * len(sae_reps), 3.2))
    axes = fig.subplots(1, len(sae_reps), squeeze=False)
    for ax, rep in zip(axes[0], sae_reps, strict=True):
        rows = doc["ablations"][rep][a]
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["mean_ablation_accuracy"] for r in rows], "o-", label="mean-ablation")
        ax.plot(ks, [r["zero_ablation_accuracy"] for r in rows], "v-", label="zero-ablation")
        ax.plot(ks, [r["refit_accuracy"] for r in rows], "s-", label="refit without")
        ax.plot(ks, [r["sufficiency_accuracy"] for r in rows], "^-", label="sufficiency")
        ax.axhline(doc["probes"][rep][a]["accuracy"], color="k", lw=1, label="full probe")
        ax.axhline(doc["attributes"][a]["chance"], color="k", ls="--", lw=1, label="majority")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k top aligned latents")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{a}: {rep}")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def heatmaps(cross: list[str], attr: str, by_rep: dict[str, CellAccuracy]) -> Figure:
    """One accuracy heatmap per representation: rows = values of the cross's first attribute,
    columns = combinations of the others; cells below the minimum count are blank."""
    reps = list(by_rep)
    cells = by_rep[reps[0]]["cells"]
    rows = sorted({c["cell"][cross[0]] for c in cells}, key=_natural)
    cols = sorted({" / ".join(c["cell"][k] for k in cross[1:]) for c in cells}, key=_natural)
    fig = Figure(figsize=(max(3.0, 0.55 * len(cols) + 1.5) * len(reps), 0.45 * len(rows) + 1.8))
    axes = fig.subplots(1, len(reps), squeeze=False)
    for ax, rep in zip(axes[0], reps, strict=True):
        grid = np.full((len(rows), len(cols)), np.nan)
        for c in by_rep[rep]["cells"]:
            if c["counted"]:
                r = rows.index(c["cell"][cross[0]])
                k = cols.index(" / ".join(c["cell"][x] for x in cross[1:]))
                grid[r, k] = c["accuracy"]
        im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_facecolor("#dddddd")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{attr} probe, {rep}", fontsize=9)
        if grid.size <= 200:
            for (r, k), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"{' x '.join(cross)} (grey: fewer images than the minimum)", fontsize=9)
    return fig


def tpp_heatmaps(t: Tpp, rep: str) -> Figure:
    """One zero-ablation drop matrix per k: rows = attribute whose top k latents are ablated,
    columns = attribute probed; red = accuracy lost."""
    attrs, rows = t["attributes"], t["rows"]
    drops = [np.array(r["zero"]["drop"]) for r in rows]
    lim = max(0.05, max(float(np.abs(m).max()) for m in drops))
    size = 0.45 * len(attrs) + 1.0
    fig = Figure(figsize=(size * len(rows) + 1.5, size + 0.6))
    axes = fig.subplots(1, len(rows), squeeze=False, sharey=True)
    for ax, r, m in zip(axes[0], rows, drops, strict=True):
        im = ax.imshow(m, vmin=-lim, vmax=lim, cmap="RdBu_r")
        ax.set_xticks(range(len(attrs)), attrs, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(attrs)), attrs, fontsize=7)
        ax.set_title(f"k={r['k']}\nTPP {r['zero']['tpp']:+.2f}", fontsize=8)
        if len(attrs) <= 12:
            for (i, j), v in np.ndenumerate(m):
                ink = "w" if abs(v) > lim / 2 else "k"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=ink)
    axes[0][0].set_ylabel("ablated", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy drop")
    fig.suptitle(f"Targeted zero-ablation, {rep}: columns = attribute probed", fontsize=9)
    return fig


def _natural(s: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


# HTML

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
code { background: #f4f4f4; padding: 0 3px; } .muted { color: #777; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
"""


TOKENS = {"patches": "the patch tokens", "all": "all tokens", "cls": "the CLS token"}
"""How the page names an SAE's training tokens and the tokens its codes are pooled over."""


def page(doc: Report) -> str:
    """report.html: a header, then one section per part of the report."""
    link = _Links(doc["visuals"])
    parts = _header(doc)
    parts += _attributes(doc)
    parts += _probes(doc)
    parts += _confusions(doc)
    if doc["alignment"]:
        parts += _alignment(doc, link)
    if doc["ablations"]:
        parts += _ablations(doc, link)
    if doc["tpp"]:
        parts += tpp_html(doc)
    if doc["intersections"]:
        parts.append("<h2>Intersectional cells</h2>")
    for inter in doc["intersections"]:
        parts += _intersection(doc, inter, link)
    parts.append("</body></html>\n")
    return "\n".join(parts)


e = html.escape


def fmt(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


class _Links:
    """Latent ids as links to their `saev visuals` pages, or plain ids without a visuals folder."""

    def __init__(self, visuals: str | None):
        self.visuals = visuals

    def __call__(self, i: int) -> str:
        if self.visuals is None:
            return f"{i}"
        href = f"{self.visuals.rstrip('/')}/latents/{i}.html"
        return f'<a href="{e(href)}">{i}</a>'


def _header(doc: Report) -> list[str]:
    sae = doc["sae"]
    return [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>saev probe report</title>",
        "<link rel='icon' href='data:,'>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Probe report</h1>",
        "<p>",
        f"Shards <code>{e(doc['shard_root'])}</code>, layer {doc['layer']}, ViT "
        f"<code>{e(str(doc['vit']['ckpt']))}</code>"
        + ("" if doc["vit"]["pretrained"] else " <b>(random weights)</b>")
        + (
            f"; SAE <code>{e(doc['ckpt'])}</code> ({sae['d_sae']} latents, trained on "
            f"{e(TOKENS.get(sae['tokens'], 'unrecorded tokens'))}; codes pooled over "
            f"{TOKENS[sae['pooled_over']]})"
            if doc["ckpt"] and sae
            else ""
        )
        + ".<br>",
        f"Split: {e(doc['split']['how'])}; {doc['split']['n_train']} train, "
        f"{doc['split']['n_test']} held-out images.</p>",
    ]


def _attributes(doc: Report) -> list[str]:
    parts = [
        "<h2>Attributes</h2><table><tr><th class='l'>attribute</th><th class='l'>classes</th>",
        "<th>train</th><th>held out</th><th>missing</th><th>majority acc.</th></tr>",
    ]
    for a, info in doc["attributes"].items():
        parts.append(
            f"<tr><td class='l'>{e(a)}</td><td class='l'>{e(', '.join(info['classes']))}</td>"
            f"<td>{info['n_train']}</td><td>{info['n_test']}</td><td>{info['n_missing']}</td>"
            f"<td>{fmt(info['chance'])}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _probes(doc: Report) -> list[str]:
    parts = [
        "<h2>Probes</h2><p class='muted'>Standardised multinomial logistic regression; ",
        "L2 strength chosen on a validation fold of the train split; held-out scores.</p>",
        "<table><tr><th class='l'>representation</th><th class='l'>attribute</th>",
        "<th>accuracy</th><th>balanced acc.</th><th>macro-F1</th><th>lam</th></tr>",
    ]
    for rep, by_attr in doc["probes"].items():
        for a, s in by_attr.items():
            parts.append(
                f"<tr><td class='l'>{e(rep)}</td><td class='l'>{e(a)}</td><td>{fmt(s['accuracy'])}</td>"
                f"<td>{fmt(s['balanced_accuracy'])}</td><td>{fmt(s['macro_f1'])}</td>"
                f"<td>{s['lam']:g}</td></tr>"
            )
    parts.append("</table>")
    if doc["plots"]["accuracy"]:
        parts.append(f"<img src='{e(doc['plots']['accuracy'])}' alt='probe accuracy'>")
    return parts


def _confusions(doc: Report) -> list[str]:
    parts = []
    for rep, by_attr in doc["probes"].items():
        for a, s in by_attr.items():
            classes = doc["attributes"][a]["classes"]
            parts.append(f"<details><summary>Confusion matrix: {e(a)}, {e(rep)}</summary><table>")
            parts.append("<tr><th class='l'>true \\ predicted</th>")
            parts += [f"<th>{e(c)}</th>" for c in classes]
            parts.append("</tr>")
            for c, row in zip(classes, s["confusion"], strict=True):
                parts.append(
                    f"<tr><th class='l'>{e(c)}</th>" + "".join(f"<td>{v}</td>" for v in row)
                )
                parts.append("</tr>")
            parts.append("</table></details>")
    return parts


def _alignment(doc: Report, latent: _Links) -> list[str]:
    parts = [
        "<h2>Latent alignment</h2><p class='muted'>Computed on the train split. ",
        "AUROC: one-vs-rest; selectivity (μ<sub>c</sub>−μ<sub>rest</sub>)/",
        "(|μ<sub>c</sub>|+|μ<sub>rest</sub>|+ε); rate: firing rate in the class.</p>",
    ]
    for rep, by_attr in doc["alignment"].items():
        for a, info in by_attr.items():
            parts.append(f"<details><summary>{e(a)}, {e(rep)}: top latents per class</summary>")
            parts.append(f"<p class='muted'>Full matrices: <code>{e(info['file'])}</code></p>")
            for c, rows in info["top"].items():
                parts.append(f"<h4>{e(a)} = {e(c)}</h4><table><tr><th>latent</th><th>AUROC</th>")
                parts.append(
                    "<th>selectivity</th><th>rate</th><th>mean</th><th>mean rest</th></tr>"
                )
                for r in rows:
                    parts.append(
                        f"<tr><td>{latent(r['latent'])}</td><td>{fmt(r['auroc'])}</td>"
                        f"<td>{fmt(r['selectivity'])}</td><td>{fmt(r['rate'])}</td>"
                        f"<td>{fmt(r['mean'], 4)}</td><td>{fmt(r['mean_rest'], 4)}</td></tr>"
                    )
                parts.append("</table>")
            parts.append("</details>")
    return parts


_ABLATION_COLUMNS = (
    "mean_ablation_accuracy",
    "mean_ablation_drop",
    "zero_ablation_accuracy",
    "zero_ablation_drop",
    "refit_accuracy",
    "refit_drop",
    "sufficiency_accuracy",
)


def _ablations(doc: Report, latent: _Links) -> list[str]:
    parts = [
        "<h2>Ablations of the top aligned latents</h2><p class='muted'>Latents ranked by "
        "their best one-vs-rest AUROC over classes; the fitted probe scored with those k "
        "latents <b>mean-ablated</b> (replaced by their training means: no information, no "
        "shift) and <b>zero-ablated</b> (set to 0, the SAE literature's ablation: also "
        "shifts the logits), a probe <b>refit</b> without them, and their "
        "<b>sufficiency</b> (a probe on those k latents alone).</p>"
    ]
    for a, img in doc["plots"]["ablations"].items():
        parts.append(f"<img src='{e(img)}' alt='ablations for {e(a)}'>")
    for rep, by_attr in doc["ablations"].items():
        for a, rows in by_attr.items():
            full = doc["probes"][rep][a]["accuracy"]
            parts.append(
                f"<h4>{e(a)}, {e(rep)} (full probe {fmt(full)})</h4><table><tr><th>k</th>"
                "<th>mean-ablation</th><th>drop</th><th>zero-ablation</th><th>drop</th>"
                "<th>refit</th><th>drop</th><th>sufficiency</th>"
                "<th class='l'>latents</th></tr>"
            )
            for r in rows:
                shown = ", ".join(latent(i) for i in r["latents"][:10])
                more = f" … (+{len(r['latents']) - 10})" if len(r["latents"]) > 10 else ""
                cells = [r["k"]] + [fmt(r[key]) for key in _ABLATION_COLUMNS]
                parts.append(
                    "<tr>"
                    + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td class='l'>{shown}{more}</td></tr>"
                )
            parts.append("</table>")
    return parts


def _intersection(doc: Report, inter: Intersection, latent: _Links) -> list[str]:
    cross = inter["cross"]
    parts = [
        f"<h3>{e(' × '.join(cross))}</h3><table><tr><th class='l'>probe</th>",
        "<th class='l'>representation</th><th>cells counted</th><th>worst</th>",
        "<th class='l'>worst cell</th><th>best</th><th>gap</th></tr>",
    ]
    for a, by_rep in inter["accuracy"].items():
        for rep, s in by_rep.items():
            wc = "–" if s["worst_cell"] is None else " / ".join(s["worst_cell"].values())
            parts.append(
                f"<tr><td class='l'>{e(a)}</td><td class='l'>{e(rep)}</td>"
                f"<td>{s['n_counted']} of {len(s['cells'])} (n ≥ {s['min_n']})</td>"
                f"<td>{fmt(s['worst_accuracy'])}</td><td class='l'>{e(wc)}</td>"
                f"<td>{fmt(s['best_accuracy'])}</td><td>{fmt(s['gap'])}</td></tr>"
            )
    parts.append("</table>")
    for p in doc["plots"]["cells"]:
        if p["cross"] == cross:
            parts.append(f"<img src='{e(p['file'])}' alt='cell accuracy, {e(p['attribute'])}'>")
    if inter["departures"]:
        parts += _departures(inter, latent)
    return parts


def _departures(inter: Intersection, latent: _Links) -> list[str]:
    fit = inter["departure_fit"]
    assert fit is not None  # departures come with the fit that produced them
    parts = [
        "<details><summary>Latents whose firing rate departs most from the "
        "no-interaction model</summary><p class='muted'>Expected: the logistic model "
        f"<code>{e(fit['model'])}</code> fitted to the joint attribute table (IPF, "
        f"{fit['sweeps']} sweeps; {fit['boundary']} latent(s) fitted on the boundary, "
        f"{fit['unconverged']} unconverged); z: Pearson residual of the cell's firing "
        "count.</p><table><tr><th class='l'>cell</th><th>n</th>",
        "<th class='l'>latent (rate vs expected, z)</th></tr>",
    ]
    for d in inter["departures"]:
        items = ", ".join(
            f"{latent(r['latent'])} ({r['rate']:.2f} vs {r['expected']:.2f}, z={r['z']:+.1f})"
            for r in d["latents"][:5]
        )
        parts.append(
            f"<tr><td class='l'>{e(' / '.join(d['cell'].values()))}</td><td>{d['n']}</td>"
            f"<td class='l'>{items}</td></tr>"
        )
    parts.append("</table></details>")
    return parts


def tpp_html(doc: Report) -> list[str]:
    """The targeted-ablation section: TPP per k and the drop matrices."""
    parts = [
        "<h2>Targeted ablation (TPP)</h2><p class='muted'>For each attribute A, its top k "
        "latents (the ranking above) are ablated and every attribute's probe is scored: "
        "drop[A, B] is the accuracy drop of B's probe. TPP = mean diagonal drop − mean "
        "off-diagonal drop: high when each attribute's latents matter to its own probe only. "
        "Zero-ablation is SAEBench's; mean-ablation removes the latents' information "
        "without shifting the logits.</p>"
    ]
    for rep, t in doc["tpp"].items():
        attrs = t["attributes"]
        parts.append(
            f"<h4>{e(rep)}</h4><table><tr><th>k</th><th>TPP (zero)</th><th>diagonal</th>"
            "<th>off-diagonal</th><th>TPP (mean)</th><th>diagonal</th><th>off-diagonal</th></tr>"
        )
        for r in t["rows"]:
            z, m = r["zero"], r["mean"]
            vals = [z["tpp"], z["diagonal"], z["off_diagonal"]]
            vals += [m["tpp"], m["diagonal"], m["off_diagonal"]]
            parts.append(
                f"<tr><td>{r['k']}</td>" + "".join(f"<td>{v:.3f}</td>" for v in vals) + "</tr>"
            )
        parts.append("</table>")
        if rep in doc["plots"]["tpp"]:
            parts.append(f"<img src='{e(doc['plots']['tpp'][rep])}' alt='TPP drops, {e(rep)}'>")
        parts.append(
            f"<details><summary>Drop matrices, {e(rep)} (zero-ablation / mean-ablation)</summary>"
        )
        for r in t["rows"]:
            parts.append(f"<table><tr><th class='l'>k={r['k']}: ablated \\ probed</th>")
            parts += [f"<th>{e(b)}</th>" for b in attrs]
            parts.append("</tr>")
            for i, a in enumerate(attrs):
                row = "".join(
                    f"<td>{r['zero']['drop'][i][j]:.3f} / {r['mean']['drop'][i][j]:.3f}</td>"
                    for j in range(len(attrs))
                )
                parts.append(f"<tr><th class='l'>{e(a)}</th>{row}</tr>")
            parts.append("</table>")
        parts.append("</details>")
    return parts
