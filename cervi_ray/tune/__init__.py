"""Ray Tune sweeps: k-fold cross-validation and the pruning search."""
