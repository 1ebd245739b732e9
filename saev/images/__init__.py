"""Image datasets for `saev activations`: `images:folder`, `images:fairface`, `images:demo`.

Each is a frozen config dataclass with `load(strict=...) -> ImageList`; `Images` is their
union, which tyro turns into the `images:NAME` subcommands.
"""

import typing

import tyro

from saev.images.common import IMAGE_EXTS, ImageDataset, ImageList
from saev.images.demo import Demo
from saev.images.fairface import FairFace
from saev.images.folder import Folder

Images = (
    typing.Annotated[Folder, tyro.conf.subcommand("folder")]
    | typing.Annotated[FairFace, tyro.conf.subcommand("fairface")]
    | typing.Annotated[Demo, tyro.conf.subcommand("demo")]
)

__all__ = ["IMAGE_EXTS", "Demo", "FairFace", "Folder", "ImageDataset", "ImageList", "Images"]
