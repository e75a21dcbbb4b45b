"""The evaluation protocol's experiments: sweeps of independent runs, comparisons and ablations."""
