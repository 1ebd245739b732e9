"""One trained SAE on disk and in memory: `save`, `load` and the single-SAE module `SAE`.

A checkpoint directory holds `config.json` (schema, family, sizes, hyperparameters, input
scale, saev version and whatever the trainer passed as `extra`: layer, tokens, shard
metadata, ...) and `sae.safetensors` (every weight and buffer of the member, without the
stack axis). `config.json` is written last, so a directory without it is incomplete.

`load` also reads reference saev 0.1 `sae.pt` files: one JSON header line, then a torch
state dict. Those are read with `torch.load(weights_only=True)`, which refuses anything
but tensors and plain containers; such a refusal becomes a UserError.
"""

import io
import json
import os
import pathlib
import pickle
import typing

import safetensors.torch
import torch
from torch import Tensor, nn

import saev
from saev import helpers
from saev.errors import UserError
from saev.nn.stack import Stack

SCHEMA = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"


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

    def encode(self, x: Tensor) -> Tensor:
        """Raw [..., d_vit] -> codes [..., d_sae]."""
        lead = x.shape[:-1]
        return self.stack.encode(x.reshape(-1, x.shape[-1]))[0].reshape(*lead, self.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Codes [..., d_sae] -> raw reconstruction [..., d_vit]."""
        lead = f.shape[:-1]
        return self.stack.decode(f.reshape(1, -1, f.shape[-1]))[0].reshape(*lead, self.d_vit)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


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


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """A checkpoint dir, its config.json / sae.safetensors, or a reference saev 0.1 `sae.pt`."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return _load_legacy(path).to(device)
    ckpt_dir = path if path.is_dir() else path.parent
    cfg_path, weights_path = ckpt_dir / CONFIG_NAME, ckpt_dir / WEIGHTS_NAME
    if not cfg_path.is_file() and (ckpt_dir / "sae.pt").is_file():
        return _load_legacy(ckpt_dir / "sae.pt").to(device)
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
    """Reference saev 0.1: a JSON header line then `torch.save(state_dict)`; ReLU SAE, no scale."""
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
    return SAE(stack, {"legacy_header": header, "source": str(path)})
