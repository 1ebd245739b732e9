"""saev: sparse autoencoders for vision transformers.

Record a ViT's residual stream to disk (`saev.shards`), train stacked sweeps of SAEs
(`saev.nn`, `saev.train`), score them (`saev.evaluate`), look at what each latent fires
on (`saev.visuals`) and probe demographic traits (`saev.probe`).
"""

__version__ = "0.2.0"
