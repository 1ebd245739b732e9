"""One trained SAE on disk: `save` and `load` (the in-memory `SAE` is in `saev.nn.sae`).

A checkpoint directory holds `config.json` (schema, family, sizes, hyperparameters, input
scale, saev version and whatever the trainer passed as `extra`: layer, tokens, shard
metadata, ...) and `sae.safetensors` (every weight and buffer of the member, without the
stack axis). `config.json` is written last, so a directory without it is incomplete.

`load` also reads reference saev 0.1 `sae.pt` files: one JSON header line, then a torch
state dict. Those are read with `torch.load(weights_only=True)`, which refuses anything
but tensors and plain containers; such a refusal becomes a UserError. A 0.1 run directory
(`sae.pt` and 0.1's training `config.json`) loads the same way, and its config says how the
SAE's inputs were normalised, which layer and tokens it read, and from which shards. A loaded
0.1 SAE is a `LegacySAE`: `x_hat, f_x, loss = sae(x)` as with 0.1's own module.

saev 0.1 normalised its inputs, x' = (x - m) / c with m the dataset mean (`scale_mean`) and c
chosen so that E||x - m|| / c = sqrt(d_vit) (`scale_norm`), both on by default, and did not
store m or c in sae.pt. A 0.1 SAE trained with either is therefore marked
`cfg["input_normalisation"] = LEGACY_UNKNOWN` until `calibrate_legacy` re-estimates m and c
from activations and folds them into the input scale and b_dec; one trained with both off
(the 0.1 guide's advice) takes raw activations as it is.
"""

import io
import json
import logging
import math
import os
import pathlib
import pickle
import typing

import safetensors.torch
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saev import helpers
from saev.errors import UserError
from saev.nn import hparams
from saev.nn.registry import make_stack
from saev.nn.sae import LEGACY_UNKNOWN, SAE, SCHEMA
from saev.nn.stack import Stack
from saev.shards import Tokens

logger = logging.getLogger("saev.nn")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"
LEGACY_RAW = "none (saev 0.1 with scale_mean and scale_norm false: raw activations)"
"""`cfg["input_normalisation"]` of a saev 0.1 SAE trained on raw activations."""


class Loss(typing.NamedTuple):
    """saev 0.1's loss terms, the third value of its `SparseAutoencoder.forward` (0.1's
    saev/nn.py), computed on the input given: scalars, averaged over every leading axis."""

    mse: Tensor
    """Mean over all elements of (x_hat - x)^2 (0.1: `safe_mse(x_hat, x).mean()`)."""
    sparsity: Tensor
    """sparsity_coeff * l1, with 0.1's coefficient from the checkpoint (0 when it names none)."""
    ghost_grad: Tensor
    """0: 0.1's ghost-gradient loss only ran in training."""
    l0: Tensor
    """Mean number of nonzero latents per token."""
    l1: Tensor
    """Mean sum of the latents per token."""

    @property
    def loss(self) -> Tensor:
        """Total loss, as 0.1's `Loss.loss`: mse + sparsity + ghost_grad."""
        return self.mse + self.sparsity + self.ghost_grad


class LegacySAE(SAE):
    """A saev 0.1 SAE loaded by `load`: calling it gives `(x_hat, f_x, loss)` as 0.1's module
    did (`loss` a `Loss`); `encode`, `decode` and everything else are `SAE`'s.

    Its inputs are raw activations, like every saev SAE, once its input normalisation is
    known (`needs_calibration` is False); until then it computes exactly 0.1's module on the
    activations given, which is what 0.1's inference guide did with raw activations.
    """

    def forward(self, x: Float[Tensor, "*batch d_vit"]) -> tuple[Tensor, Tensor, Loss]:
        f_x = self.encode(x)
        x_hat = self.decode(f_x)
        lam = self.cfg.get("legacy_sparsity_coeff") or 0.0
        l1 = f_x.sum(-1).mean()
        zero = torch.zeros((), dtype=x_hat.dtype, device=x_hat.device)
        loss = Loss(
            mse=(x_hat - x).pow(2).mean(),
            sparsity=lam * l1,
            ghost_grad=zero,
            l0=(f_x > 0).sum(-1).to(x_hat.dtype).mean(),
            l1=l1,
        )
        return x_hat, f_x, loss


@jaxtyped(typechecker=beartype)
def save(
    stack: Stack | SAE, member_i: int, ckpt_dir: str | os.PathLike, extra: dict | None = None
) -> pathlib.Path:
    """Write member `member_i` of `stack` (or an SAE) to `ckpt_dir`; returns the directory."""
    sae = stack if isinstance(stack, SAE) else stack.member(member_i)
    cfg = {**sae.cfg, **(extra or {})}
    cfg["input_scale"] = float(sae.stack.scale[0])
    ckpt_dir = pathlib.Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v[0].detach().cpu().contiguous() for k, v in sae.stack.state_dict().items()}
    helpers.atomic_write_bytes(ckpt_dir / WEIGHTS_NAME, safetensors.torch.save(tensors))
    helpers.atomic_write_json(ckpt_dir / CONFIG_NAME, cfg)
    return ckpt_dir


@jaxtyped(typechecker=beartype)
def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """A checkpoint dir, its config.json / sae.safetensors, or a reference saev 0.1 `sae.pt`
    (whose input normalisation must then be re-estimated: see `calibrate_legacy`).

    Everything is checked before a tensor is built: config.json field by field (`read_config`),
    then the tensor names, shapes and dtypes of sae.safetensors against it. Every error is a
    UserError of one line that starts with the file at fault."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; expected {_EXPECTED}.")
    if path.is_file() and path.suffix in LEGACY_SUFFIXES:
        return _load_legacy_warn(path).to(device)
    if path.is_file() and path.name not in (CONFIG_NAME, WEIGHTS_NAME):
        raise UserError(f"{path}: not a checkpoint file; expected {_EXPECTED}.")
    ckpt_dir = path if path.is_dir() else path.parent
    cfg_path, weights_path = ckpt_dir / CONFIG_NAME, ckpt_dir / WEIGHTS_NAME
    if not weights_path.is_file() and (ckpt_dir / "sae.pt").is_file():
        # A saev 0.1 run directory: sae.pt, and 0.1's training config.json beside it.
        return _load_legacy_warn(ckpt_dir / "sae.pt").to(device)
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise UserError(
                f"{p}: missing; expected an SAE checkpoint with {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
    cfg = read_config(cfg_path)
    family, d_vit, d_sae = cfg["family"], cfg["d_vit"], cfg["d_sae"]
    shapes = _tensor_shapes(weights_path)
    # The two big matrices first, so that a wrong d_vit/d_sae never allocates a stack.
    for key, want in (("W_enc", [d_vit, d_sae]), ("W_dec", [d_sae, d_vit])):
        if key not in shapes:
            raise UserError(
                f"{weights_path}: no tensor {key!r}; expected the tensors of the {family} SAE "
                f"of {cfg_path}."
            )
        if shapes[key] != want:
            raise UserError(
                f"{weights_path}: tensor {key!r} has shape {shapes[key]}, but {cfg_path} "
                f"(d_vit={d_vit}, d_sae={d_sae}) needs {want}."
            )
    stack = _make(family, d_vit, d_sae, cfg["hparams"], cfg_path)
    want = {k: v[0] for k, v in stack.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or unexpected:
        raise UserError(
            f"{weights_path}: tensors do not match the {family} SAE of {cfg_path} "
            f"(missing {missing}, unexpected {unexpected})."
        )
    for key, value in want.items():
        if shapes[key] != list(value.shape):
            raise UserError(
                f"{weights_path}: tensor {key!r} has shape {shapes[key]}, but {cfg_path} "
                f"({family}, d_vit={d_vit}, d_sae={d_sae}) needs {list(value.shape)}."
            )
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except Exception as err:
        raise UserError(f"{weights_path}: not a readable safetensors file ({_line(err)}).") from err
    for key, value in want.items():
        _check_tensor(weights_path, key, tensors[key], value.dtype)
    scale = float(tensors["scale"])
    if scale != float(torch.tensor(cfg["input_scale"], dtype=tensors["scale"].dtype)):
        raise UserError(
            f"{weights_path}: scale={scale!r} but {cfg_path} has input_scale={cfg['input_scale']!r}; "
            "expected the same input scale in both."
        )
    stack.load_state_dict({k: v[None] for k, v in tensors.items()})
    extra = {k: v for k, v in cfg.items() if k not in _CORE_KEYS}
    sae = SAE(stack, extra)
    sae.cfg = cfg
    return sae.to(device)


LEGACY_SUFFIXES = (".pt", ".pth", ".bin")
"""File suffixes `load` reads as reference saev 0.1 checkpoints."""
_EXPECTED = (
    f"an SAE checkpoint directory ({CONFIG_NAME} + {WEIGHTS_NAME}), one of those two files, "
    "a saev 0.1 sae.pt or its run directory"
)
_CORE_KEYS = ("schema", "family", "d_vit", "d_sae", "hparams")
_INFERENCE_HPARAMS = {"topk": ("k",), "vsae-topk": ("k",), "matryoshka": ("base", "k")}
"""Hyperparameters that a family's inference rule reads. A config.json without them cannot be
encoded faithfully; every other key only shapes training, and one missing from an older
config.json takes today's default."""
_TOKENS = typing.get_args(Tokens)
"""`tokens` a trainer records."""


def read_config(cfg_path: pathlib.Path) -> dict[str, typing.Any]:
    """config.json, validated field by field, older formats migrated, hyperparameters filled
    in (`check_hparams`). UserError naming `cfg_path` and the field on any bad value."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{cfg_path}: not a readable JSON file ({_line(err)}).") from err
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object; got {type(cfg).__name__}.")
    for key in (*_CORE_KEYS, "input_scale"):
        if key not in cfg:
            raise UserError(f"{cfg_path}: missing key {key!r}.")
    if type(cfg["schema"]) is not int or cfg["schema"] != SCHEMA:
        raise UserError(
            f"{cfg_path}: schema {cfg['schema']!r} is not supported; expected {SCHEMA}."
        )
    if not isinstance(cfg["family"], str) or cfg["family"] not in hparams.FAMILIES:
        raise UserError(
            f"{cfg_path}: unknown SAE family {cfg['family']!r}; "
            f"expected one of {', '.join(hparams.FAMILIES)}."
        )
    for key in ("d_vit", "d_sae"):
        if type(cfg[key]) is not int or cfg[key] <= 0:
            raise UserError(f"{cfg_path}: {key}={cfg[key]!r}: expected a positive integer.")
    if not isinstance(cfg["hparams"], dict):
        raise UserError(
            f"{cfg_path}: hparams={cfg['hparams']!r}: expected an object of hyperparameters."
        )
    cfg = _migrate(cfg, cfg_path)
    family = cfg["family"]
    for key in _INFERENCE_HPARAMS.get(family, ()):
        if key not in cfg["hparams"]:
            raise UserError(
                f"{cfg_path}: hparams has no {key!r}, which the {family} inference rule reads."
            )
    try:
        cfg["hparams"] = hparams.check_hparams(family, cfg["hparams"])
    except UserError as err:
        raise UserError(f"{cfg_path}: {err}") from err
    _check_fields(cfg, cfg_path)
    return cfg


def _check_fields(cfg: dict[str, typing.Any], where: pathlib.Path) -> None:
    """Types and ranges of the fields other than family, sizes and hyperparameters."""

    def fail(key: str, expected: str) -> typing.NoReturn:
        raise UserError(f"{where}: {key}={cfg[key]!r}: expected {expected}.")

    s = cfg["input_scale"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        fail("input_scale", "a finite number > 0")
    if not isinstance(cfg.get("saev_version", ""), str):
        fail("saev_version", "a version string")
    if cfg.get("layer") is not None and type(cfg["layer"]) is not int:
        fail("layer", "an integer block index or null")
    if cfg.get("tokens") is not None and cfg["tokens"] not in _TOKENS:
        fail("tokens", f"one of {', '.join(_TOKENS)} or null")
    if cfg.get("shard_root") is not None and not isinstance(cfg["shard_root"], str):
        fail("shard_root", "a directory path or null")
    for key in ("shards", "split"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            fail(key, "an object or null")
    frac = (cfg.get("split") or {}).get("eval_frac", 0.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise UserError(f"{where}: split.eval_frac={frac!r}: expected a number in [0, 1).")
    norm = cfg.get("input_normalisation")
    if norm is not None and norm != LEGACY_UNKNOWN and not isinstance(norm, dict):
        fail("input_normalisation", f"{LEGACY_UNKNOWN!r} or an object")


def _migrate(cfg: dict[str, typing.Any], where: pathlib.Path) -> dict[str, typing.Any]:
    """Configs of older saev versions, read as what they are today (docs/checkpoints.md)."""
    hp = cfg["hparams"]
    if cfg["family"] == "vsae-mixture" and "prior_corr" in hp:
        # saev 0.2.0's vsae-mixture: ReLU(z) under a correlated-pair Gaussian prior and no L1.
        # The prior only enters the training loss; its encode/decode are vsae-iso's exactly.
        logger.warning(
            "%s: a vsae-mixture of the old correlated-pair prior (prior_corr=%r); it loads as "
            "vsae-iso (the same encode and decode, no L1), since vsae-mixture now means a "
            "Gaussian-mixture prior. Re-save it with saev.nn.save to drop this warning.",
            where,
            hp["prior_corr"],
        )
        rest = {k: v for k, v in hp.items() if k != "prior_corr"}
        return {
            **cfg,
            "family": "vsae-iso",
            "hparams": {"sparsity_coeff": 0.0, **rest},
            "migrated_from": {"family": "vsae-mixture", "prior_corr": hp["prior_corr"]},
        }
    if cfg["family"] == "vsae-iso" and "sparsity_coeff" not in hp:
        # Before vsae-iso had an L1 it trained without one: record that, not today's default.
        return {**cfg, "hparams": {**hp, "sparsity_coeff": 0.0}}
    return cfg


def _make(family: str, d_vit: int, d_sae: int, hp: dict, where: pathlib.Path) -> Stack:
    try:
        return make_stack(family, d_vit=d_vit, d_sae=d_sae, members=[hp])
    except UserError as err:
        raise UserError(f"{where}: {err}") from err


def _tensor_shapes(weights_path: pathlib.Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file, from its header (no data read)."""
    try:
        with safetensors.safe_open(weights_path, framework="pt") as f:
            names = f.keys()
            return {k: list(f.get_slice(k).get_shape()) for k in names}
    except Exception as err:
        raise UserError(f"{weights_path}: not a readable safetensors file ({_line(err)}).") from err


def _check_tensor(where: pathlib.Path, key: str, value: Tensor, want: torch.dtype) -> None:
    """The kind of dtype the module holds (float, integer, bool), and finite floats."""

    def kind(dtype: torch.dtype) -> str:
        return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "integer"

    if kind(value.dtype) != kind(want):
        raise UserError(
            f"{where}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}; "
            f"expected a {kind(want)} tensor."
        )
    if value.dtype.is_floating_point:
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise UserError(
                f"{where}: tensor {key!r} has {bad} non-finite value(s) (NaN or Inf); "
                "expected finite weights."
            )


def _line(err: BaseException) -> str:
    """An exception as one line (some libraries' messages span several)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _load_legacy_warn(path: pathlib.Path) -> LegacySAE:
    sae = _load_legacy(path)
    if sae.needs_calibration:
        logger.warning(
            "%s: a saev 0.1 checkpoint; it was trained on %s activations whose statistics "
            "sae.pt does not store, so its codes on raw activations are wrong until "
            "saev.nn.calibrate_legacy re-estimates them from shards (saev evaluate, visuals and "
            "probe do this).",
            path,
            _scaling_words(sae.cfg["legacy_scaling"]),
        )
    return sae


def _load_legacy(path: pathlib.Path) -> LegacySAE:
    """Reference saev 0.1: a JSON header line then `torch.save(state_dict)`; a ReLU SAE with
    input scale 1, and what 0.1's training config (the header, and the run's config.json
    beside sae.pt) says of its input normalisation, layer, tokens and shards."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: unreadable ({_line(err)}).") from err
    newline = raw.find(b"\n")
    try:
        header = json.loads(raw[:newline].decode("utf-8")) if newline >= 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UserError(
            f"{path}: not a saev 0.1 checkpoint (expected one JSON header line, then a state dict)."
        )
    try:
        state = torch.load(io.BytesIO(raw[newline + 1 :]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path}: refused to load: the file needs arbitrary Python objects unpickled; "
            "only tensors and plain containers are accepted (weights_only=True)."
        ) from err
    except Exception as err:
        raise UserError(
            f"{path}: the state dict after the header is unreadable ({type(err).__name__}: {_line(err)})."
        ) from err
    needed = ("W_enc", "b_enc", "W_dec", "b_dec")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), Tensor) for k in needed):
        raise UserError(f"{path}: expected a state dict with tensors {', '.join(needed)}.")
    if state["W_enc"].ndim != 2:
        raise UserError(
            f"{path}: tensor 'W_enc' has shape {list(state['W_enc'].shape)}; expected [d_vit, d_sae]."
        )
    d_vit, d_sae = state["W_enc"].shape
    cfg = header.get("cfg", header)
    cfg = cfg if isinstance(cfg, dict) else {}
    if type(cfg.get("d_vit")) is int and cfg["d_vit"] != d_vit:
        raise UserError(
            f"{path}: the header says d_vit={cfg['d_vit']} but tensor 'W_enc' has shape "
            f"{[d_vit, d_sae]}; expected [d_vit, d_sae]."
        )
    run_path = path.parent / CONFIG_NAME
    run = _read_legacy_run(run_path)
    hp = {"seed": cfg["seed"]} if type(cfg.get("seed")) is int and cfg["seed"] >= 0 else {}
    lam = _legacy_sparsity_coeff(cfg, run)
    if lam is not None:
        hp["sparsity_coeff"] = lam  # range checked by check_hparams, which names the file
    stack = _make("relu", d_vit, d_sae, hp, path)
    with torch.no_grad():
        for key in needed:
            want = getattr(stack, key)
            if state[key].shape != want.shape[1:]:
                raise UserError(
                    f"{path}: tensor {key!r} has shape {list(state[key].shape)}, inconsistent "
                    f"with W_enc {[d_vit, d_sae]}; expected {list(want.shape[1:])}."
                )
            _check_tensor(path, key, state[key], want.dtype)
            want.copy_(state[key][None].float())
    data = run.get("data") if isinstance(run.get("data"), dict) else cfg.get("data")
    data = data if isinstance(data, dict) else {}
    scaling = {
        "mean": bool(data.get("scale_mean", True)),
        "norm": bool(data.get("scale_norm", True)),
    }
    extra: dict[str, typing.Any] = {
        "legacy_header": header,
        "source": str(path),
        "legacy_sparsity_coeff": lam,
        "legacy_scaling": scaling,
        "input_normalisation": LEGACY_UNKNOWN if scaling["mean"] or scaling["norm"] else LEGACY_RAW,
    }
    if run:
        extra["legacy_run"] = {"config": str(run_path), **run}
        extra.update(_legacy_data_keys(data))
    return LegacySAE(stack, extra)


def _read_legacy_run(path: pathlib.Path) -> dict[str, typing.Any]:
    """saev 0.1's training config (`config.json` beside its sae.pt), or {} when there is none.
    A saev checkpoint config (it has a `schema`) is not one."""
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path}: not a readable JSON file ({_line(err)}); expected saev 0.1's training "
            "config beside its sae.pt (or no file)."
        ) from err
    if not isinstance(run, dict) or "schema" in run:
        return {}
    return run


def _legacy_sparsity_coeff(header_cfg: dict, run: dict) -> float | None:
    """0.1's sparsity coefficient: in the header (0.1 kept it in the SAE config), or in the
    run's `sae` or `objective` table."""
    for where in (header_cfg, run.get("sae"), run.get("objective")):
        lam = where.get("sparsity_coeff") if isinstance(where, dict) else None
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            return float(lam)
    return None


def _legacy_data_keys(data: dict) -> dict[str, typing.Any]:
    """`layer`, `tokens` and `shard_root` as saev records them, from 0.1's `data` table
    (0.1's "all"/"meanpool" layers and "meanpool" patches have no saev counterpart)."""
    out: dict[str, typing.Any] = {}
    if type(data.get("layer")) is int:
        out["layer"] = data["layer"]
    if data.get("patches") in ("patches", "cls"):
        out["tokens"] = data["patches"]
    if isinstance(data.get("shard_root"), str) and data["shard_root"]:
        out["shard_root"] = data["shard_root"]
    return out


def _scaling_words(scaling: dict[str, bool]) -> str:
    parts = [
        w for w, on in (("mean-centred", scaling["mean"]), ("rescaled", scaling["norm"])) if on
    ]
    return ", ".join(parts) or "raw"


# saev 0.1 input normalisation.


@jaxtyped(typechecker=beartype)
def calibrate_legacy(sae: SAE, sample: Float[Tensor, "n d_vit"]) -> SAE:
    """Re-estimate a saev 0.1 SAE's input normalisation from raw activations and fold it in.

    saev 0.1 fed its SAE x' = s*(x - m), with m the sample mean (0 with scale_mean off) and
    s = sqrt(d_vit) / mean ||x - m|| over the sample (1 with scale_norm off). This stack
    computes x~ = s*x - b_dec and decodes (f W_dec + b_dec) / s, so setting the input scale
    to s and b_dec <- b_dec + s*m gives x~ = x' - b_dec (the 0.1 encoder input) and a decode
    of (x'_hat / s) + m: exactly the 0.1 SAE on the normalised activations, mapped back to
    raw units. Which of m and s 0.1 used is `cfg["legacy_scaling"]` (from the run's config;
    both when unknown). Modifies `sae` in place and returns it; `sample` should be the SAE's
    layer and token selection.
    """
    if not sae.needs_calibration:
        raise ValueError(
            f"calibrate_legacy: input_normalisation is {sae.cfg.get('input_normalisation')!r}; "
            "only an uncalibrated saev 0.1 SAE can be calibrated (and only once)."
        )
    if sample.shape[-1] != sae.d_vit or sample.shape[0] < 2:
        raise UserError(
            f"saev 0.1 calibration needs at least 2 activations of d_vit={sae.d_vit}; "
            f"got {list(sample.shape)}."
        )
    scaling = sae.cfg.get("legacy_scaling") or {"mean": True, "norm": True}
    x = sample.detach().to(torch.float64)
    mean = x.mean(0) if scaling["mean"] else torch.zeros_like(x[0])
    mean_norm = float((x - mean).norm(dim=-1).mean())
    if scaling["norm"] and (not math.isfinite(mean_norm) or mean_norm <= 0):
        raise UserError(
            f"saev 0.1 calibration: the activation sample has mean centred norm {mean_norm}; "
            "expected a finite value > 0."
        )
    s = math.sqrt(sae.d_vit) / mean_norm if scaling["norm"] else 1.0
    stack = sae.stack
    with torch.no_grad():
        stack.scale.fill_(s)
        stack.b_dec.add_((s * mean).to(stack.b_dec)[None])
    sae.cfg["input_scale"] = float(stack.scale[0])
    sae.cfg["input_normalisation"] = {
        "rule": "saev 0.1: x' = s*(x - mean), "
        + ("mean: the sample mean" if scaling["mean"] else "mean = 0 (scale_mean off)")
        + ", "
        + ("s = sqrt(d_vit) / mean ||x - mean||" if scaling["norm"] else "s = 1 (scale_norm off)"),
        "n_tokens": int(x.shape[0]),
        "mean_norm": mean_norm,
        "scale": s,
    }
    return sae
