"""corral: a self-hosted device cloud, wire-compatible with Particle's /v1 API."""

__version__ = "0.1.0"
