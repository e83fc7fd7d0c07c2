"""Ratios printed against a target: three decimals, so that 0.794 does not print
as a met "0.80", and a ``!`` on every miss (shared by the benchmarks)."""

from __future__ import annotations


def mark(ratio: float, target: float, higher_is_better: bool = True) -> str:
    """``ratio`` with three decimals, ``!`` appended when it misses ``target``."""
    met = ratio >= target if higher_is_better else ratio <= target
    return f"{ratio:.3f}" + ("" if met else "!")
