"""`saev train`: sweep grids (`sweep`), schedules, the one-pass training loop and its logs.

Entry point: `saev.train.main` (`Config`, `main`); user guide: docs/train.md, docs/sweep.md.
"""
