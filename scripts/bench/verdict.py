"""Ratios printed against a target: three decimals, so that 0.794 does not print
as a met "0.80", and a ``!`` on every miss (shared by the benchmarks)."""

from __future__ import annotations


def mark(ratio: float, target: float, *, at_most: bool = False) -> str:
    """``ratio`` with three decimals, ``!`` appended when it misses ``target``: a
    floor, or with ``at_most`` a ceiling (sizes and times against another tool's)."""
    met = ratio <= target if at_most else ratio >= target
    return f"{ratio:.3f}" + ("" if met else "!")
