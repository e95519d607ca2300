"""CPA Monitor: request monitoring for CLIProxyAPI, served to Grafana."""

__version__ = "0.1.0"
