"""Panoramic monitoring: one set of Prometheus rules and one Grafana dashboard for both runtimes
(``rules``), the local Prometheus, Alertmanager and PostgreSQL exporter configuration
(``config``), and the drill's receiver of the alerts Alertmanager delivers (``receiver``).

Never: start a process (the runtime does), or install anything.
"""
