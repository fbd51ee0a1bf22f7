"""How long a create takes beyond its file work: a small spec string, sampled seeded.

Large regions take minutes on real storage; the benchmark models that with a
distribution rather than by writing gigabytes:

- ``fixed:SECONDS``
- ``uniform:LOW,HIGH``
- ``lognormal:MEDIAN,SIGMA,MIN,MAX`` (median and bounds in seconds; ``SIGMA`` is the
  standard deviation of the underlying normal, so the tail grows with it)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


class InvalidDelay(ValueError):
    pass


@dataclass(frozen=True)
class Fixed:
    seconds: float

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float
    minimum: float
    maximum: float

    def sample(self, rng: random.Random) -> float:
        drawn = rng.lognormvariate(math.log(self.median), self.sigma)
        return min(max(drawn, self.minimum), self.maximum)


Delay = Fixed | Uniform | LogNormal

_ARITY = {"fixed": 1, "uniform": 2, "lognormal": 4}


def parse_delay(spec: str) -> Delay:
    """``fixed:0.5``, ``uniform:0.1,2`` or ``lognormal:30,0.8,5,300``."""
    kind, _, arguments = spec.strip().partition(":")
    if kind not in _ARITY:
        raise InvalidDelay(
            f"unknown delay kind {kind!r} in {spec!r}; use fixed, uniform or lognormal"
        )
    try:
        values = [float(part) for part in arguments.split(",")] if arguments else []
    except ValueError:
        raise InvalidDelay(f"delay {spec!r}: arguments must be numbers") from None
    if len(values) != _ARITY[kind]:
        raise InvalidDelay(f"delay {spec!r}: {kind} takes {_ARITY[kind]} number(s)")
    if any(not math.isfinite(value) or value < 0 for value in values):
        raise InvalidDelay(f"delay {spec!r}: numbers must be finite and not negative")
    if kind == "fixed":
        return Fixed(values[0])
    if kind == "uniform":
        low, high = values
        if low > high:
            raise InvalidDelay(f"delay {spec!r}: low is above high")
        return Uniform(low, high)
    median, sigma, minimum, maximum = values
    if median <= 0:
        raise InvalidDelay(f"delay {spec!r}: the median must be positive")
    if minimum > maximum:
        raise InvalidDelay(f"delay {spec!r}: the minimum is above the maximum")
    return LogNormal(median, sigma, minimum, maximum)
