"""Calibration: statistics collected with forward hooks, and one function per algorithm."""

from .stats import collect_input_stats

__all__ = ["collect_input_stats"]
