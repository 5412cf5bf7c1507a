"""Usage metering: per-device, per-month counters of device traffic (data operations)."""
