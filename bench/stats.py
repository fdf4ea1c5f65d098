"""The one way bench/ takes a percentile: the benchmarks (run, neighbour, runc_probe)
and the soak report all summarize latencies with :func:`percentile`, so their p50 and
p95 mean the same thing."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in 0..100) of ``values``, linearly interpolated
    between the two nearest ranks (numpy's default method, ``linear``)."""
    if not values:
        raise ValueError("a percentile of no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
