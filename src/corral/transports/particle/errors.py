"""The common base of every error a Particle peer can provoke (handshake, framing, CoAP)."""

from __future__ import annotations


class ParticleProtocolError(Exception):
    """A peer sent something the protocol does not allow; the session must be closed."""
