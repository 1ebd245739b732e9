"""Backbones: one `Vit` wrapper over open_clip (clip, siglip) and timm (dinov2, any ViT).

The wrapper exposes what recording needs and nothing else: the list of residual blocks, the
width of the stream, the patch grid, whether token 0 is CLS, and how many prefix tokens
(CLS + registers) come before the patches in a block's output. All of it is read from the
model, so the user only names a checkpoint. `forward` gives the image embedding; a timm
classifier is kept apart (`head`) and only when asked for (`saev evaluate --downstream`),
so recording never pays for it.

Checkpoint strings:
- clip / siglip (open_clip): `ARCH/pretrained-tag` (e.g. `ViT-B-32/openai`), `hf-hub:org/name`,
  `ARCH/path/to/weights.pt` (a local file), or a bare `ARCH` with random weights.
- dinov2 / timm: a timm model name (`vit_small_patch14_reg4_dinov2.lvd142m`), `hf-hub:org/name`,
  `NAME/path/to/weights.safetensors` (a local file); dinov2 also accepts the torch-hub names the
  reference saev used (`dinov2_vitb14_reg`).
"""

import contextlib
import difflib
import logging
import os
import pathlib
import typing

import torch
from torch import nn

from saev.errors import UserError

logger = logging.getLogger("saev.vits")

FAMILIES = ("clip", "siglip", "dinov2", "timm")
Family = typing.Literal["clip", "siglip", "dinov2", "timm"]

# torch-hub DINOv2 names (as used by the reference saev) -> timm names.
DINOV2_ALIASES = {
    f"dinov2_vit{s}14{r}": f"vit_{size}_patch14{'_reg4' if r else ''}_dinov2.lvd142m"
    for s, size in [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]
    for r in ("", "_reg")
}


class Vit(nn.Module):
    """A vision transformer with the facts recording needs; `forward` is the model's own."""

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        ckpt: str,
        blocks: nn.ModuleList,
        d_vit: int,
        image_size: tuple[int, int],
        patch_grid: tuple[int, int],
        cls_token: bool,
        n_prefix: int,
        batch_first: bool,
        pretrained: bool,
        transform: typing.Callable,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.family, self.ckpt = family, ckpt
        self.blocks = blocks
        self.d_vit = int(d_vit)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.cls_token = bool(cls_token)
        self.n_prefix = int(n_prefix)
        """Tokens before the first patch in a block's output: CLS (if any) and registers."""
        self.batch_first = batch_first
        self.pretrained = pretrained
        self.transform = transform
        self.head = head
        """Classifier from `forward`'s output to logits (timm models built with `head=True` whose
        checkpoint has one); None otherwise."""

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def n_registers(self) -> int:
        return self.n_prefix - int(self.cls_token)

    def resolve_layers(self, layers: typing.Sequence[int]) -> list[int]:
        """Block indices with negatives counted from the end; UserError when out of range."""
        out = []
        for layer in layers:
            if not -self.n_blocks <= layer < self.n_blocks:
                raise UserError(
                    f"--vit-layers {layer} is out of range for {self.ckpt!r}, which has "
                    f"{self.n_blocks} blocks (valid: {-self.n_blocks}..{self.n_blocks - 1})."
                )
            out.append(layer % self.n_blocks)
        if len(set(out)) != len(out):
            raise UserError(f"--vit-layers {list(layers)} names the same block twice ({out}).")
        return out

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """The image embedding: CLIP/SigLIP's projected embedding, a timm model's pooled
        pre-logits features (its CLS token or mean patch, after the final norm)."""
        return self.model(imgs)


def make_vit(
    family: str, ckpt: str, *, pretrained: bool = True, head: bool = False, **kwargs
) -> Vit:
    """Build the ViT named by `family` and `ckpt` in eval mode, without gradients.

    `pretrained=False` gives random weights (the only way to get them). `head=True` also keeps
    a timm model's classifier as `vit.head` (None for models without one, and for open_clip);
    the trunk, and the random weights drawn for it, are the same either way. Extra `kwargs` go
    to `timm.create_model` (e.g. `img_size=`, `depth=` for tiny test models).
    """
    if family in ("clip", "siglip"):
        vit = _make_open_clip(family, ckpt, pretrained=pretrained, **kwargs)
    elif family in ("dinov2", "timm"):
        vit = _make_timm(family, ckpt, pretrained=pretrained, head=head, **kwargs)
    else:
        raise UserError(
            f"--vit-family {family!r} is unknown; expected one of {', '.join(FAMILIES)}."
        )
    vit.eval().requires_grad_(False)
    return vit


def make_recorded_vit(
    family: str, ckpt: str, *, pretrained: bool, seed: int, head: bool = False
) -> Vit:
    """The ViT of a recording (shard metadata `vit_family`, `vit_ckpt`, `pretrained`, `seed`).

    `saev activations` seeds torch's RNG with `seed` before building the model, so random
    weights (`pretrained=False`) come out bit-identical here. The caller's RNG state is left
    as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_vit(family, ckpt, pretrained=pretrained, head=head)


def make_img_transform(family: str, ckpt: str, **kwargs) -> typing.Callable:
    """The model's eval-time image transform (PIL image -> float tensor [3, H, W]).

    Built from the architecture alone (on the meta device), so no weights are loaded.
    """
    return make_vit(family, ckpt, pretrained=False, _meta=True, **kwargs).transform


# open_clip


def _split_open_clip(ckpt: str) -> tuple[str, str | None]:
    if ckpt.startswith(("hf-hub:", "local-dir:")):
        return ckpt, None
    arch, _, tag = ckpt.partition("/")
    return arch, tag or None


def _make_open_clip(
    family: str, ckpt: str, *, pretrained: bool, _meta: bool = False, **kwargs
) -> Vit:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if kwargs:
        raise TypeError(f"open_clip models take no extra arguments; got {sorted(kwargs)}.")
    arch, tag = _split_open_clip(ckpt)
    hub = arch.startswith(("hf-hub:", "local-dir:"))
    if not hub and arch not in open_clip.list_models():
        raise UserError(
            f"--vit-ckpt {ckpt!r}: open_clip has no architecture {arch!r}"
            + _suggest(arch, open_clip.list_models())
        )
    weights: str | None = None
    if pretrained and not hub:
        if tag is None:
            raise UserError(
                f"--vit-ckpt {ckpt!r}: expected ARCH/pretrained-tag (tags for {arch}: "
                f"{_some(open_clip.list_pretrained_tags_by_model(arch))}), "
                "ARCH/path/to/weights, or pass --random-weights."
            )
        if tag in open_clip.list_pretrained_tags_by_model(arch):
            weights = tag
        elif pathlib.Path(tag).is_file() or pathlib.Path("/" + tag).is_file():
            weights = tag if pathlib.Path(tag).is_file() else "/" + tag
        else:
            raise UserError(
                f"--vit-ckpt {ckpt!r}: {tag!r} is neither a pretrained tag of {arch} ("
                f"{_some(open_clip.list_pretrained_tags_by_model(arch))}) nor a file."
            )
    device = "meta" if _meta else "cpu"
    try:
        with _quiet_root_logger():
            if hub:
                model = open_clip.create_model(arch, load_weights=pretrained, device=device)
            else:
                model = open_clip.create_model(arch, pretrained=weights, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(_load_error(family, ckpt, err)) from err
    pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    transform = image_transform_v2(pp, is_train=False)
    visual = model.visual
    if hasattr(visual, "trunk"):  # open_clip's TimmModel wraps a timm ViT (most SigLIPs)
        return _wrap_timm(
            visual.trunk,
            family=family,
            ckpt=ckpt,
            pretrained=pretrained,
            transform=transform,
            model=visual,
        )
    if not hasattr(visual, "transformer") or not hasattr(visual, "grid_size"):
        raise UserError(
            f"--vit-ckpt {ckpt!r}: the open_clip image tower is a {type(visual).__name__}, "
            "not a vision transformer."
        )
    return Vit(
        visual,
        family=family,
        ckpt=ckpt,
        blocks=visual.transformer.resblocks,
        d_vit=visual.transformer.width,
        image_size=tuple(visual.image_size),
        patch_grid=tuple(visual.grid_size),
        cls_token=True,
        n_prefix=1,
        batch_first=getattr(visual.transformer, "batch_first", True),
        pretrained=pretrained,
        transform=transform,
    )


@contextlib.contextmanager
def _quiet_root_logger():
    # open_clip logs to the root logger ("initialized randomly", download failures); we report
    # both ourselves, in one line.
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(old)


# timm


def _make_timm(
    family: str,
    ckpt: str,
    *,
    pretrained: bool,
    head: bool = False,
    _meta: bool = False,
    **kwargs,
) -> Vit:
    import timm
    import timm.data

    name, file = ckpt, None
    if family == "dinov2":
        name = DINOV2_ALIASES.get(name, name)
    if not name.startswith(("hf-hub:", "hf_hub:")) and "/" in name:
        name, _, file = name.partition("/")
        file = file if pathlib.Path(file).is_file() else "/" + file
        if not pathlib.Path(file).is_file():
            raise UserError(f"--vit-ckpt {ckpt!r}: weights file {file!r} does not exist.")
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        raise UserError(
            f"--vit-ckpt {ckpt!r}: timm has no model {name!r}"
            + _suggest(name.split(".")[0], timm.list_models())
        )
    no_weights = not timm.list_pretrained(name) and not timm.list_pretrained(f"{name}.*")
    if pretrained and not file and not name.startswith(("hf-hub:", "hf_hub:")) and no_weights:
        raise UserError(
            f"--vit-ckpt {ckpt!r}: timm has no pretrained weights for {name!r}; pass a weights "
            "file as NAME/path/to/weights or use --random-weights."
        )
    if file:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(file))
    try:
        # The meta device builds the architecture without allocating weights (transform only).
        with torch.device("meta") if _meta else contextlib.nullcontext():
            if head and pretrained and not _meta:
                model, classifier = _timm_with_head(name, ckpt, **kwargs)
            else:
                model = timm.create_model(
                    name, pretrained=pretrained and not _meta, num_classes=0, **kwargs
                )
                classifier = _random_head(model) if head and not _meta else None
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(_load_error(family, ckpt, err)) from err
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    return _wrap_timm(
        model,
        family=family,
        ckpt=ckpt,
        pretrained=pretrained,
        transform=transform,
        head=classifier,
    )


def _timm_with_head(name: str, ckpt: str, **kwargs) -> tuple[nn.Module, nn.Module | None]:
    """A pretrained timm model and its own classifier, split so that the model returns the
    pre-logits features as with `num_classes=0`."""
    import timm

    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as err:  # e.g. a local weights file saved without its classifier
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        logger.warning("%s: no classifier weights (%s); logits are not available.", ckpt, first)
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs), None
    if not getattr(model, "num_classes", 0):
        return model, None
    classifier = model.get_classifier()
    model.reset_classifier(0)
    return model, classifier


def _random_head(model: nn.Module) -> nn.Module | None:
    """A random classifier of the architecture's default size, drawn after the trunk from the
    same RNG (so it is reproducible from the recording's seed, and the trunk is untouched)."""
    n_classes = int((getattr(model, "pretrained_cfg", None) or {}).get("num_classes") or 0)
    if n_classes <= 0:
        return None
    d = int(getattr(model, "head_hidden_size", model.num_features))
    return nn.Linear(d, n_classes)


def _wrap_timm(
    trunk: nn.Module,
    *,
    family: str,
    ckpt: str,
    pretrained: bool,
    transform: typing.Callable,
    model: nn.Module | None = None,
    head: nn.Module | None = None,
) -> Vit:
    if not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
        raise UserError(f"--vit-ckpt {ckpt!r}: {type(trunk).__name__} is not a vision transformer.")
    if getattr(trunk, "dynamic_img_size", False):
        logger.info("%s uses dynamic image size; recording at its default size.", ckpt)
    has_cls = getattr(trunk, "has_class_token", getattr(trunk, "cls_token", None) is not None)
    return Vit(
        model if model is not None else trunk,
        family=family,
        ckpt=ckpt,
        blocks=trunk.blocks,
        d_vit=trunk.embed_dim,
        image_size=tuple(trunk.patch_embed.img_size),
        patch_grid=tuple(trunk.patch_embed.grid_size),
        cls_token=bool(has_cls),
        n_prefix=int(getattr(trunk, "num_prefix_tokens", int(has_cls))),
        batch_first=True,
        pretrained=pretrained,
        transform=transform,
        head=head,
    )


# Errors


def _some(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else "."


def _load_error(family: str, ckpt: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        " The weights are not in the local cache and HF_HUB_OFFLINE=1 forbids downloading them."
        if offline
        else " Check the name and your network connection (or pre-download the weights)."
    )
    return f"could not load {family} weights {ckpt!r}: {first[:200]}.{hint}"
