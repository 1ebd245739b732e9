"""saev 0.1 checkpoints meet the shards they encode: the one place commands calibrate them.

A reference saev 0.1 `sae.pt` was trained on mean-centred, rescaled activations and stores
neither the mean nor the scale, so `saev.nn.load` marks it uncalibrated. Before evaluate,
visuals or probe encode shards with it, the normalisation is re-estimated from those very
shards (`saev.nn.calibrate_legacy` on a sample of the SAE's layer and tokens). `saev.nn`
reads no shards; this module, above both, joins them.
"""

import logging

import torch

from saev.nn import SAE, calibrate_legacy
from saev.shards import Shards, Tokens, iter_images

logger = logging.getLogger("saev.calibration")

LEGACY_SAMPLE_TOKENS = 100_000
"""Tokens `calibrate_for_shards` reads (the first ones in image order)."""


def calibrate_for_shards(
    sae: SAE, shards: Shards, layer: int, tokens: Tokens, n_tokens: int = LEGACY_SAMPLE_TOKENS
) -> bool:
    """Make `sae` ready to encode `layer` / `tokens` of `shards`: a saev 0.1 SAE gets its input
    normalisation re-estimated on the first `n_tokens` tokens (image order), in place; any
    other SAE is left alone. Returns whether it calibrated."""
    if not sae.needs_calibration:
        return False
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
