"""Activation shards: the on-disk format written by `saev activations` and read by everyone.

See docs/formats.md for the format and docs/internals.md for this interface.
"""

from saev.shards.metadata import LEGACY, PROTOCOL, Metadata
from saev.shards.reader import ImageIndex, Shards, Tokens, all_finite, iter_images
from saev.shards.writer import ShardWriter, read_skipped, read_status, write_image_index

__all__ = [
    "LEGACY",
    "PROTOCOL",
    "ImageIndex",
    "Metadata",
    "ShardWriter",
    "Shards",
    "Tokens",
    "all_finite",
    "iter_images",
    "read_skipped",
    "read_status",
    "write_image_index",
]
