"""What each SAE latent fires on: streaming top-k (`topk`), heatmaps (`render`) and a static
offline explorer (`site`); `python -m saev visuals` is `saev.visuals.main`."""
