"""The probe's report document: what `report.json` holds, typed.

`saev.probe.main` builds it, the fitting modules return its pieces, and `saev.probe.report`
draws it. They are TypedDicts, not dataclasses, because the document *is* the JSON: it is
written as it is and read back by tests and users with plain indexing. docs/probe.md
explains what each number means.
"""

import typing


class Vit(typing.TypedDict):
    family: str
    ckpt: str
    pretrained: bool


class SaeInfo(typing.TypedDict):
    d_sae: int
    tokens: str | None
    """What the SAE was trained on (None: not recorded)."""
    pooled_over: typing.Literal["patches", "cls"]
    """The tokens whose codes are pooled per image."""


class Split(typing.TypedDict):
    how: str
    """The split in words (official or random, and where from)."""
    n_train: int
    n_test: int


class AttributeInfo(typing.TypedDict):
    classes: list[str]
    n_missing: int
    n_train: int
    n_test: int
    train_counts: list[int]
    test_counts: list[int]
    chance: float
    """Held-out accuracy of always answering the train split's majority class."""


class Representation(typing.TypedDict):
    dim: int
    cache: typing.Literal["cached", "built"]


class Scores(typing.TypedDict):
    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    confusion: list[list[int]]
    """Rows: true class; columns: predicted class."""


class Selection(typing.TypedDict):
    lams: list[float]
    val_accuracy: list[float]
    best: float


class ProbeResult(Scores):
    lam: float
    selection: Selection


class AlignedLatent(typing.TypedDict):
    latent: int
    auroc: float
    selectivity: float
    rate: float
    mean: float
    mean_rest: float


class RankedLatent(typing.TypedDict):
    latent: int
    score: float


class AlignmentSummary(typing.TypedDict):
    file: str
    """The full matrices, relative to the output folder."""
    top: dict[str, list[AlignedLatent]]
    """Class -> its top latents."""
    ranking: list[RankedLatent]
    """The ranking the ablations use (first 100)."""


class AblationRow(typing.TypedDict):
    k: int
    latents: list[int]
    mean_ablation_accuracy: float
    mean_ablation_drop: float
    zero_ablation_accuracy: float
    zero_ablation_drop: float
    refit_accuracy: float
    refit_drop: float
    sufficiency_accuracy: float


class TppDrops(typing.TypedDict):
    drop: list[list[float]]
    """[ablated attribute][probed attribute] accuracy drop."""
    diagonal: float
    off_diagonal: float
    tpp: float


class TppRow(typing.TypedDict):
    k: int
    zero: TppDrops
    mean: TppDrops


class Tpp(typing.TypedDict):
    attributes: list[str]
    ablations: list[str]
    rows: list[TppRow]


class Cell(typing.TypedDict):
    cell: dict[str, str]
    """Attribute -> value."""
    n: int
    accuracy: float | None
    counted: bool
    """Whether the cell has enough held-out images to enter worst/best/gap."""


class CellAccuracy(typing.TypedDict):
    cells: list[Cell]
    n_counted: int
    min_n: int
    worst_accuracy: float | None
    worst_cell: dict[str, str] | None
    best_accuracy: float | None
    best_cell: dict[str, str] | None
    gap: float | None


class DepartingLatent(typing.TypedDict):
    latent: int
    rate: float
    expected: float
    diff: float
    z: float


class Departure(typing.TypedDict):
    cell: dict[str, str]
    n: int
    latents: list[DepartingLatent]


class DepartureFit(typing.TypedDict):
    model: str
    sweeps: int
    boundary: int
    unconverged: int


class Intersection(typing.TypedDict):
    cross: list[str]
    accuracy: dict[str, dict[str, CellAccuracy]]
    """Probed attribute -> representation -> per-cell accuracy."""
    departures: list[Departure]
    departure_fit: DepartureFit | None


class CellPlot(typing.TypedDict):
    cross: list[str]
    attribute: str
    file: str


class Plots(typing.TypedDict):
    accuracy: str | None
    ablations: dict[str, str]
    """Attribute -> PNG."""
    tpp: dict[str, str]
    """Representation -> PNG."""
    cells: list[CellPlot]


class Report(typing.TypedDict):
    """report.json. Per-representation sections are keyed representation -> attribute."""

    shard_root: str
    ckpt: str | None
    layer: int
    vit: Vit
    sae: SaeInfo | None
    split: Split
    attributes: dict[str, AttributeInfo]
    representations: dict[str, Representation]
    probes: dict[str, dict[str, ProbeResult]]
    alignment: dict[str, dict[str, AlignmentSummary]]
    ablations: dict[str, dict[str, list[AblationRow]]]
    tpp: dict[str, Tpp]
    intersections: list[Intersection]
    visuals: str | None
    """The visuals folder relative to the output folder (latent links), or None."""
    config: dict[str, typing.Any]
    latents_of_interest: typing.NotRequired[list[int]]
    """What to pass to `saev visuals --include-latents` so every linked latent has a page."""
    plots: typing.NotRequired[Plots]
    """Added by `report.write`."""
