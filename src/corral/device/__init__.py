"""The corral device SDK: a device (or thousands) talking to corral over MQTT.

    from corral.device import Device

    dev = Device(device_id, secret, host="127.0.0.1", port=1883)

    @dev.function("led")
    def led(arg: str) -> int: ...

    dev.variable("temperature", "double", read_temperature)
    await dev.run_forever()

It imports only ``corral.device.*`` and corral's sans-IO MQTT codec, never the server.
See ``docs/device-sdk.md``.
"""

from corral.device.backoff import Backoff
from corral.device.client import (
    Device,
    EventHandler,
    FunctionHandler,
    OtaHandler,
    VariableGetter,
)
from corral.device.errors import (
    ConnectError,
    DeviceSDKError,
    NotConnected,
    PublishRefused,
    SubscribeRefused,
    reason_name,
)
from corral.device.members import VariableType, check_event_name

__all__ = [
    "Backoff",
    "ConnectError",
    "Device",
    "DeviceSDKError",
    "EventHandler",
    "FunctionHandler",
    "NotConnected",
    "OtaHandler",
    "PublishRefused",
    "SubscribeRefused",
    "VariableGetter",
    "VariableType",
    "check_event_name",
    "reason_name",
]
