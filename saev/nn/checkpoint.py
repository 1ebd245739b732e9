"""One trained SAE on disk and in memory: `save`, `load` and the single-SAE module `SAE`.

A checkpoint directory holds `config.json` (schema, family, sizes, hyperparameters, input
scale, saev version and whatever the trainer passed as `extra`: layer, tokens, shard
metadata, ...) and `sae.safetensors` (every weight and buffer of the member, without the
stack axis). `config.json` is written last, so a directory without it is incomplete.

`load` also reads reference saev 0.1 `sae.pt` files: one JSON header line, then a torch
state dict. Those are read with `torch.load(weights_only=True)`, which refuses anything
but tensors and plain containers; such a refusal becomes a UserError.

saev 0.1 trained on normalised inputs, (x - m) / c with m the dataset mean and c chosen so
that E||x - m|| / c = sqrt(d_vit), and did not store m or c in sae.pt. A loaded 0.1 SAE is
therefore marked `cfg["input_normalisation"] = LEGACY_UNKNOWN` until `calibrate_legacy`
re-estimates m and c from activations and folds them into the input scale and b_dec.
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
from torch import Tensor, nn

import saev
from saev import helpers
from saev.errors import UserError
from saev.nn.stack import Stack

logger = logging.getLogger("saev.nn")

SCHEMA = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"
LEGACY_UNKNOWN = "unknown (saev 0.1: re-estimate from shards)"
"""`cfg["input_normalisation"]` of a saev 0.1 SAE that `calibrate_legacy` has not seen yet."""
LEGACY_SAMPLE_TOKENS = 100_000
"""Tokens `calibrate_legacy_from_shards` reads (the first ones in image order)."""


class SAE(nn.Module):
    """One SAE taking RAW activations: `encode(x) -> f`, `decode(f) -> x_hat`, `forward(x) -> x_hat`.

    Wraps an S=1 stack (`.stack`) and always uses the inference rule (no sampling; BatchTopK
    uses its threshold), whatever `train()`/`eval()` says.
    """

    def __init__(self, stack: Stack, extra: dict[str, typing.Any]):
        super().__init__()
        if stack.S != 1:
            raise ValueError(f"SAE wraps a single member; got a stack of {stack.S}.")
        self.stack = stack.eval()
        self.cfg = {
            "schema": SCHEMA,
            "family": stack.family,
            "d_vit": stack.d_vit,
            "d_sae": stack.d_sae,
            "hparams": dict(stack.members[0]),
            "input_scale": float(stack.scale[0]),
            "saev_version": saev.__version__,
            **extra,
        }

    @property
    def family(self) -> str:
        return self.stack.family

    @property
    def d_vit(self) -> int:
        return self.stack.d_vit

    @property
    def d_sae(self) -> int:
        return self.stack.d_sae

    @property
    def layer(self) -> int | None:
        return self.cfg.get("layer")

    @property
    def tokens(self) -> str | None:
        return self.cfg.get("tokens")

    def train(self, mode: bool = True) -> "SAE":
        super().train(mode)
        self.stack.eval()
        return self

    @property
    def needs_calibration(self) -> bool:
        """True for a saev 0.1 SAE whose input normalisation is not known yet."""
        return self.cfg.get("input_normalisation") == LEGACY_UNKNOWN

    # Checked on every call: the check costs tens of microseconds, the matmuls of a
    # [4096, 768] batch milliseconds.
    @jaxtyped(typechecker=beartype)
    def encode(self, x: Float[Tensor, "*batch d_vit"]) -> Float[Tensor, "*batch d_sae"]:
        """Raw [..., d_vit] -> codes [..., d_sae]."""
        lead = x.shape[:-1]
        return self.stack.encode(x.reshape(-1, x.shape[-1]))[0].reshape(*lead, self.d_sae)

    @jaxtyped(typechecker=beartype)
    def decode(self, f: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_vit"]:
        """Codes [..., d_sae] -> raw reconstruction [..., d_vit]."""
        lead = f.shape[:-1]
        return self.stack.decode(f.reshape(1, -1, f.shape[-1]))[0].reshape(*lead, self.d_vit)

    def forward(self, x: Float[Tensor, "*batch d_vit"]) -> Float[Tensor, "*batch d_vit"]:
        return self.decode(self.encode(x))


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
    (whose input normalisation must then be re-estimated: see `calibrate_legacy`)."""
    path = pathlib.Path(path)
    ckpt_dir = path if path.is_dir() else path.parent
    cfg_path, weights_path = ckpt_dir / CONFIG_NAME, ckpt_dir / WEIGHTS_NAME
    legacy = None
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        legacy = path
    elif not cfg_path.is_file() and (ckpt_dir / "sae.pt").is_file():
        legacy = ckpt_dir / "sae.pt"
    if legacy is not None:
        logger.warning(
            "%s: a saev 0.1 checkpoint; it was trained on mean-centred, rescaled activations "
            "whose statistics sae.pt does not store, so its codes on raw activations are wrong "
            "until saev.nn.calibrate_legacy re-estimates them from shards (saev evaluate, "
            "visuals and probe do this).",
            legacy,
        )
        return _load_legacy(legacy).to(device)
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise UserError(
                f"{p}: missing; expected an SAE checkpoint with {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg_path}: not valid JSON ({err}).") from err
    if cfg.get("schema") != SCHEMA:
        raise UserError(
            f"{cfg_path}: schema {cfg.get('schema')!r} is not supported; expected {SCHEMA}."
        )
    for key in ("family", "d_vit", "d_sae", "hparams"):
        if key not in cfg:
            raise UserError(f"{cfg_path}: missing key {key!r}.")
    stack = make(cfg["family"], cfg["d_vit"], cfg["d_sae"], [cfg["hparams"]])
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except Exception as err:
        raise UserError(f"{weights_path}: not a readable safetensors file ({err}).") from err
    _load_state(stack, {k: v[None] for k, v in tensors.items()}, weights_path)
    extra = {
        k: v for k, v in cfg.items() if k not in ("schema", "family", "d_vit", "d_sae", "hparams")
    }
    sae = SAE(stack, extra)
    sae.cfg = cfg
    return sae.to(device)


def make(family: str, d_vit: int, d_sae: int, members: list[dict]) -> Stack:
    from saev.nn import make_stack

    return make_stack(family, d_vit=d_vit, d_sae=d_sae, members=members)


def _load_state(stack: Stack, state: dict[str, Tensor], where: pathlib.Path) -> None:
    want = stack.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise UserError(
            f"{where}: tensors do not match a {stack.family} SAE (missing {missing}, unexpected {unexpected})."
        )
    for key in want:
        value = state[key]
        if value.shape != want[key].shape:
            raise UserError(
                f"{where}: tensor {key!r} has shape {list(value.shape[1:])}, expected {list(want[key].shape[1:])}."
            )
    stack.load_state_dict(state)


def _load_legacy(path: pathlib.Path) -> SAE:
    """Reference saev 0.1: a JSON header line then `torch.save(state_dict)`; a ReLU SAE with
    input scale 1 and its input normalisation marked unknown (see `calibrate_legacy`)."""
    raw = path.read_bytes()
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
            f"{path}: the state dict after the header is unreadable ({type(err).__name__}: {err})."
        ) from err
    needed = ("W_enc", "b_enc", "W_dec", "b_dec")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), Tensor) for k in needed):
        raise UserError(f"{path}: expected a state dict with tensors {', '.join(needed)}.")
    d_vit, d_sae = state["W_enc"].shape
    cfg = header.get("cfg", header)
    hp = {"seed": cfg["seed"]} if isinstance(cfg.get("seed"), int) and cfg["seed"] >= 0 else {}
    family = "relu"
    if isinstance(cfg.get("sparsity_coeff"), (int, float)):
        hp["sparsity_coeff"] = float(cfg["sparsity_coeff"])
    stack = make(family, d_vit, d_sae, [hp])
    with torch.no_grad():
        for key in needed:
            if state[key].shape != getattr(stack, key).shape[1:]:
                raise UserError(
                    f"{path}: tensor {key!r} has shape {list(state[key].shape)}, inconsistent with W_enc."
                )
            getattr(stack, key).copy_(state[key][None].float())
    return SAE(
        stack,
        {"legacy_header": header, "source": str(path), "input_normalisation": LEGACY_UNKNOWN},
    )


# saev 0.1 input normalisation.


@jaxtyped(typechecker=beartype)
def calibrate_legacy(sae: SAE, sample: Float[Tensor, "n d_vit"]) -> SAE:
    """Re-estimate a saev 0.1 SAE's input normalisation from raw activations and fold it in.

    saev 0.1 fed its SAE x' = s*(x - m), with m the sample mean and s = sqrt(d_vit) /
    mean ||x - m|| over the sample. This stack computes x~ = s*x - b_dec and decodes
    (f W_dec + b_dec) / s, so setting the input scale to s and b_dec <- b_dec + s*m gives
    x~ = x' - b_dec (the 0.1 encoder input) and a decode of (x'_hat / s) + m: exactly the
    0.1 SAE on the normalised activations, mapped back to raw units. Modifies `sae` in
    place and returns it; `sample` should be the SAE's layer and token selection.
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
    x = sample.detach().to(torch.float64)
    mean = x.mean(0)
    mean_norm = float((x - mean).norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise UserError(
            f"saev 0.1 calibration: the activation sample has mean centred norm {mean_norm}; "
            "expected a finite value > 0."
        )
    s = math.sqrt(sae.d_vit) / mean_norm
    stack = sae.stack
    with torch.no_grad():
        stack.scale.fill_(s)
        stack.b_dec.add_((s * mean).to(stack.b_dec)[None])
    sae.cfg["input_scale"] = float(stack.scale[0])
    sae.cfg["input_normalisation"] = {
        "rule": "saev 0.1: x' = s*(x - mean), s = sqrt(d_vit) / mean ||x - mean||",
        "n_tokens": int(x.shape[0]),
        "mean_norm": mean_norm,
        "scale": s,
    }
    return sae


def calibrate_legacy_from_shards(
    sae: SAE, shards, layer: int, tokens: str, n_tokens: int = LEGACY_SAMPLE_TOKENS
) -> bool:
    """`calibrate_legacy` on the first `n_tokens` tokens (image order) of `layer` / `tokens`
    in `shards` (a `saev.shards.Shards`), if `sae` needs it; returns whether it did."""
    if not sae.needs_calibration:
        return False
    from saev.shards import iter_images

    chunks, n = [], 0
    for _, x in iter_images(shards, layer, batch_size=256, tokens=tokens):
        x = x.reshape(-1, x.shape[-1])[: n_tokens - n]
        chunks.append(x)
        n += x.shape[0]
        if n >= n_tokens:
            break
    calibrate_legacy(sae, torch.cat(chunks) if chunks else torch.zeros(0, sae.d_vit))
    logger.info(
        "%s: saev 0.1 input normalisation re-estimated on %d tokens of layer %d (%s): scale %.4g",
        sae.cfg.get("source"),
        n,
        layer,
        tokens,
        sae.cfg["input_scale"],
    )
    return True
