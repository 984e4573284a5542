"""The daemon's observability settings, as its command line gives them (server/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TelemetryConfig:
    """The daemon's observability flags (server/cli.py)."""

    listen: str | None = None  # --metrics-listen HOST:PORT (None: no HTTP endpoint)
    token: str | None = None  # bearer token the endpoint wants (--metrics-token-file, else the admin token)
    insecure: bool = False  # --metrics-insecure: a non-loopback endpoint without a token
    interval_s: float = 2.0  # --metrics-interval: how often the front asks its workers for figures
    health_interval_s: float = 5.0  # --health-interval (0: sample once at start)
    max_temperature_c: float | None = None  # --health-max-temperature
    health_inject: str | None = None  # tests only: figures to add to each sample
