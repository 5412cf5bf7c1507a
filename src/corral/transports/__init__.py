"""Device transports: wire protocols translated to device-session calls (MQTT, Particle)."""
