"""The exporter: citadeld's HTTP listener for Prometheus and load balancers.

``server`` serves the routes; ``metrics`` holds the collectors of citadeld's
own families; ``exposition`` encodes them; ``federation/`` fetches, checks,
relabels and merges the workers' own pages; ``health_report`` and
``host_checks`` make the ``application/health+json`` report.
"""
