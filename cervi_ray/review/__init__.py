"""Review outputs for pathologists: QuPath GeoJSON, per-slide HTML pages and run reports.

Modules: geojson (reading a scoring output back, outlines of nuclei and cells as GeoJSON),
slide_report (one self-contained HTML page per scored slide), run_report (one self-contained
HTML page per training run folder) and command (the `review` command line).
"""
