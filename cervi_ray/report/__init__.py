"""Run reports: overlays, training curves and the Markdown summary."""
