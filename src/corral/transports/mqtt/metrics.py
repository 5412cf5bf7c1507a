"""Prometheus metrics of the MQTT transport."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from corral.transports.mqtt.codec import Packet

CONNECTIONS = Gauge("corral_mqtt_connections", "Open MQTT connections", ["listener"])
SESSIONS = Gauge("corral_mqtt_device_sessions", "Devices connected over MQTT")
CONNECTS = Counter("corral_mqtt_connects_total", "MQTT connection attempts by outcome",
                   ["result"])
PACKETS_IN = Counter("corral_mqtt_packets_received_total", "MQTT packets received", ["type"])
PACKETS_OUT = Counter("corral_mqtt_packets_sent_total", "MQTT packets sent", ["type"])
REFUSALS = Counter("corral_mqtt_refusals_total", "Refused MQTT publishes and subscriptions",
                   ["what", "reason"])
CLOSES = Counter("corral_mqtt_closes_total", "Ended MQTT connections by cause", ["cause"])
DROPPED = Counter("corral_mqtt_dropped_messages_total",
                  "Messages to devices dropped (queue full, too large, undeliverable topic)")

PACKET_NAMES = ("connect", "connack", "publish", "puback", "pubrec", "pubrel", "pubcomp",
                 "subscribe", "suback", "unsubscribe", "unsuback", "pingreq", "pingresp",
                 "disconnect", "auth")
RECEIVED = {n: PACKETS_IN.labels(n) for n in PACKET_NAMES}
SENT = {n: PACKETS_OUT.labels(n) for n in PACKET_NAMES}


def packet_kind(packet: Packet) -> str:
    return type(packet).__name__.lower()
