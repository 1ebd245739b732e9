"""Image datasets for `saev activations`: `images:folder`, `images:imagenet`, `images:fairface`,
`images:hf`, `images:demo`.

Each is a frozen config dataclass with `load(strict=...) -> ImageList`; `Images` is their
union, which tyro turns into the `images:NAME` subcommands. `saev.recorded` reopens
the images of a recording (saev's or saev 0.1's) for the commands that show or label them.
"""

import typing

import tyro

from saev.images.common import IMAGE_EXTS, ImageDataset, ImageList
from saev.images.demo import Demo
from saev.images.fairface import FairFace
from saev.images.folder import Folder
from saev.images.hf import HF
from saev.images.imagenet import ImageNet

Images = (
    typing.Annotated[Folder, tyro.conf.subcommand("folder")]
    | typing.Annotated[ImageNet, tyro.conf.subcommand("imagenet")]
    | typing.Annotated[FairFace, tyro.conf.subcommand("fairface")]
    | typing.Annotated[HF, tyro.conf.subcommand("hf")]
    | typing.Annotated[Demo, tyro.conf.subcommand("demo")]
)

__all__ = [
    "HF",
    "IMAGE_EXTS",
    "Demo",
    "FairFace",
    "Folder",
    "ImageDataset",
    "ImageList",
    "ImageNet",
    "Images",
]
