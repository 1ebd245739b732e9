"""`saev probe`: how image attributes are encoded in a ViT and in an SAE's latents.

Modules, in the order `main` uses them: `split` (held-out split), `reps` (pooled per-image
representations and their cache), `fit` (standardised multinomial logistic regression),
`align` (latent x class alignment metrics), `ablate` (necessity/sufficiency of the top
aligned latents, and targeted ablation across attributes), `intersect` (per-cell accuracies
and firing-rate departures), `nointeraction` (the firing rates the attributes predict without
interaction, fitted to the joint attribute table), `report` (report.json, PNG plots,
report.html).
"""
