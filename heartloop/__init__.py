"""HeartLoop: contour the heart on every planning CT, learn from corrections, send results back."""

__version__ = "0.1.0"
