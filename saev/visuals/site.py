"""The static explorer: `index.html`, `data.js` and one page per latent under `latents/`.

Everything opens from disk (file://) with no server and no network: browsers refuse
`fetch()` of local JSON, so the index's data is a script (`data.js`) that sets
`window.SAEV`, and each latent page is plain HTML written here. The table, its sorting and
the id search are `explorer.js`; styles are `style.css` (both package files in `assets/`).
"""

import collections
import dataclasses
import html
import importlib.resources
import json
import pathlib
import typing

import numpy as np

from saev.helpers import atomic_write_text
from saev.visuals.topk import TopKResult

N_THUMBS = 5
"""Heatmaps shown per latent in the index's thumbnail strip."""


@dataclasses.dataclass(frozen=True)
class ImageView:
    """One top image of a latent, as drawn on its page."""

    img: int
    """Image index in the shards."""
    value: float
    """The latent's value on the image's strongest patch."""
    heatmap: str
    """Heatmap file, relative to the output directory."""
    plain: str
    """Plain image file, relative to the output directory."""
    path: str
    """Source path from the image index (relative to the dataset root)."""
    labels: dict[str, str]
    """Labels of the image from the image index ("" = missing)."""
    missing: bool
    """True when the image file could not be read (a placeholder was drawn)."""


@dataclasses.dataclass(frozen=True)
class LatentView:
    latent: int
    freq: float
    mean: float
    max: float
    images: list[ImageView]


def write_site(
    out: pathlib.Path,
    views: list[LatentView],
    result: TopKResult,
    info: dict[str, typing.Any],
    base_rates: dict[str, dict[str, float]],
) -> None:
    """Write the explorer for the rendered `views` into `out`.

    `info` is shown at the top of each page (checkpoint, shards, layer, ...); `base_rates`
    maps each label name to the share of each value over the whole dataset, shown beside
    the label distribution of a latent's top images.
    """
    (out / "latents").mkdir(parents=True, exist_ok=True)
    assets = importlib.resources.files("saev.visuals") / "assets"
    for name in ("style.css", "explorer.js"):
        atomic_write_text(out / name, (assets / name).read_text(encoding="utf-8"))
    atomic_write_text(out / "data.js", _data_js(views, result, info))
    atomic_write_text(out / "index.html", _index_html(views, info))
    ids = [v.latent for v in views]
    for i, view in enumerate(views):
        prev_id = ids[i - 1] if i > 0 else None
        next_id = ids[i + 1] if i + 1 < len(ids) else None
        page = _latent_html(view, info, base_rates, prev_id, next_id)
        atomic_write_text(out / "latents" / f"{view.latent}.html", page)


def _round(xs: np.ndarray) -> list[float]:
    # 4 significant digits keep data.js small for SAEs with 10^4-10^5 latents.
    return [float(f"{x:.4g}") for x in np.asarray(xs, dtype=np.float64)]


def _data_js(views: list[LatentView], result: TopKResult, info: dict[str, typing.Any]) -> str:
    doc = {
        "info": info,
        "latents": [
            {
                "id": v.latent,
                "freq": v.freq,
                "mean": v.mean,
                "max": v.max,
                "thumbs": [im.heatmap for im in v.images[:N_THUMBS]],
            }
            for v in views
        ],
        # Stats of every latent, so the search can describe latents that were not rendered.
        "all": {
            "freq": _round(result.freq),
            "mean": _round(result.mean),
            "max": _round(result.max),
        },
    }
    return "window.SAEV = " + json.dumps(doc, separators=(",", ":")) + ";\n"


def _info_line(info: dict[str, typing.Any]) -> str:
    parts = [f"{html.escape(k)} <code>{html.escape(str(v))}</code>" for k, v in info.items()]
    return '<p class="meta">' + " &middot; ".join(parts) + "</p>"


def _head(title: str, css: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        f'<link rel="stylesheet" href="{css}">\n</head>\n<body>\n'
    )


def _index_html(views: list[LatentView], info: dict[str, typing.Any]) -> str:
    return (
        _head("saev latents", "style.css")
        + f"<h1>saev latents ({len(views)} rendered)</h1>\n"
        + _info_line(info)
        + '<div class="controls">\n'
        + '<input id="search" type="search" placeholder="latent id (Enter opens it)" '
        + 'autocomplete="off">\n<span id="status"></span>\n</div>\n'
        + '<table id="latents">\n<thead><tr>'
        + '<th class="sortable" data-key="id">latent</th>'
        + '<th class="sortable" data-key="freq">frequency</th>'
        + '<th class="sortable" data-key="mean">mean value</th>'
        + '<th class="sortable" data-key="max">max value</th>'
        + "<th>top images</th></tr></thead>\n<tbody></tbody>\n</table>\n"
        + '<script src="data.js"></script>\n<script src="explorer.js"></script>\n'
        + "</body>\n</html>\n"
    )


def label_distribution(
    images: list[ImageView], base_rates: dict[str, dict[str, float]]
) -> dict[str, list[tuple[str, int, float]]]:
    """Per label name: (value, count among `images`, dataset share), most common first."""
    out = {}
    for name in base_rates:
        counts = collections.Counter(im.labels.get(name, "") for im in images)
        counts.pop("", None)
        if counts:
            rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            out[name] = [(value, n, base_rates[name].get(value, 0.0)) for value, n in rows]
    return out


def _labels_html(images: list[ImageView], base_rates: dict[str, dict[str, float]]) -> str:
    dist = label_distribution(images, base_rates)
    if not dist:
        return ""
    n = len(images)
    parts = ['<h2>Labels of the top images</h2>\n<div class="labels">']
    for name, rows in dist.items():
        parts.append(
            f'<table class="label" data-label="{html.escape(name)}"><thead><tr>'
            f"<th>{html.escape(name)}</th><th>top images</th><th>dataset</th></tr></thead><tbody>"
        )
        for value, count, base in rows:
            share = count / n
            parts.append(
                f"<tr><td>{html.escape(value)}</td>"
                f'<td class="num"><span class="bar" style="width:{80 * share:.0f}px"></span> '
                f"{count} ({share:.0%})</td>"
                f'<td class="num"><span class="bar base" style="width:{80 * base:.0f}px"></span> '
                f"{base:.0%}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts.append("</div>\n")
    return "\n".join(parts)


def _figure(im: ImageView, rank: int) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in im.labels.items() if v)
    cls = ' class="missing"' if im.missing else ""
    note = " &middot; image file missing" if im.missing else ""
    return (
        f'<figure{cls} data-img="{im.img}">\n<div class="pair">'
        f'<img src="../{im.heatmap}" alt="heatmap of image {im.img}">'
        f'<img src="../{im.plain}" alt="image {im.img}"></div>\n'
        f"<figcaption>#{rank + 1} &middot; image {im.img} &middot; value {im.value:.3g}{note}"
        f"<br>{html.escape(im.path)}{'<br>' + html.escape(labels) if labels else ''}"
        "</figcaption>\n</figure>"
    )


def _latent_html(
    view: LatentView,
    info: dict[str, typing.Any],
    base_rates: dict[str, dict[str, float]],
    prev_id: int | None,
    next_id: int | None,
) -> str:
    nav = ['<a href="../index.html">all latents</a>']
    if prev_id is not None:
        nav.append(f'<a href="{prev_id}.html">&larr; latent {prev_id}</a>')
    if next_id is not None:
        nav.append(f'<a href="{next_id}.html">latent {next_id} &rarr;</a>')
    stats = (
        '<dl class="stats">'
        f"<dt>frequency</dt><dd>{view.freq:.3e} (log10 {np.log10(max(view.freq, 1e-30)):.2f})</dd>"
        f"<dt>mean value when firing</dt><dd>{view.mean:.4g}</dd>"
        f"<dt>max value</dt><dd>{view.max:.4g}</dd>"
        f"<dt>top images</dt><dd>{len(view.images)}</dd></dl>\n"
    )
    figures = "\n".join(_figure(im, r) for r, im in enumerate(view.images))
    body = figures or "<p>This latent never fired on a patch.</p>"
    return (
        _head(f"latent {view.latent}", "../style.css")
        + f'<div class="nav">{" ".join(nav)}</div>\n'
        + f"<h1>Latent {view.latent}</h1>\n"
        + _info_line(info)
        + stats
        + _labels_html(view.images, base_rates)
        + "<h2>Top images (heatmap, image)</h2>\n"
        + f'<div class="grid">\n{body}\n</div>\n</body>\n</html>\n'
    )
