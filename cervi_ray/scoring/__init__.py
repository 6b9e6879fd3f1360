"""Batch scoring of whole-slide image archives with Ray Data (the `score` command).

Modules: slides (readers), sources (listing and slide ids), resolution, tissue, grid,
postprocess (per-tile statistics), stages (the chain's work, no Ray), pipeline (the Ray Data
chain), outputs (Parquet layout, summaries, heatmaps, resume) and command (the CLI face).
"""
