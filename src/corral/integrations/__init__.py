"""Integrations: webhooks and MQTT forwarding of device events to a customer's systems."""
