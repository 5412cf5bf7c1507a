"""Particle's TCP device protocol ("lightssl"), sans-IO.

``crypto``: the RSA handshake, AES-128-CBC session with Particle's IV chaining, and the
length-prefixed framing. ``coap``: the RFC 7252 message codec as Particle uses it over TCP.
``messages``: what the CoAP messages mean to Particle (Hello, describe, events, functions,
variables, time, ping, OTA). No sockets here; the gateway and the device-side
implementation both build on these modules. Byte-level facts:
``shared/reference/particle-device-protocol.md``.
"""
