"""Calibration: statistics collected with forward hooks, and one function per algorithm."""

from .data import calibration_forward_loop
from .stats import collect_input_stats

__all__ = ["calibration_forward_loop", "collect_input_stats"]
