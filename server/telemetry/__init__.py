"""Operating the daemon: metrics, health, the dashboard, structured logs (docs/METRICS.md,
docs/DEPLOYMENT.md).

Everything here runs in the front's process and imports no torch. The loop keeps counters and
publishes snapshots (collect.py); a sampler thread reads device and host health (health.py: NVML
where there is one); an HTTP thread serves what was published (http.py: Prometheus metrics from
metrics.py, the dashboard in dashboard.html, liveness and readiness probes); logs.py writes one JSON
object per line when asked. The workers only count, in fields they keep anyway, and say it in
their REPORTs.
"""
