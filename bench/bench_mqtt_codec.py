"""B4: the MQTT packet codec — encode and decode 100,000 QoS 1 PUBLISH packets.

    .venv/bin/python bench/bench_mqtt_codec.py [--count 100000]

64-byte payload, a 43-character device topic, MQTT 3.1.1 and 5. Decoding is timed twice:
one ``feed`` per packet (small socket reads) and one ``feed`` of everything (large reads).
"""

from __future__ import annotations

import argparse
import time

from corral.transports.mqtt import Decoder, Publish, encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    n = ap.parse_args().count
    payload = bytes(64)
    print(f"{'version':8} {'encode/s':>10} {'decode/s (per packet)':>22} "
          f"{'decode/s (one feed)':>20} {'encode+decode/s':>16}")
    for version in (4, 5):
        packets = [Publish("devices/0123456789abcdef01234567/events/temp", payload, 1,
                           packet_id=i % 65535 + 1) for i in range(n)]
        t0 = time.perf_counter()
        wires = [encode(p, version) for p in packets]
        t1 = time.perf_counter()
        decoder = Decoder(version)
        one_by_one = [q for w in wires for q in decoder.feed(w)]
        t2 = time.perf_counter()
        at_once = Decoder(version).feed(b"".join(wires))
        t3 = time.perf_counter()
        assert one_by_one == packets and at_once == packets
        enc, dec1, dec2 = t1 - t0, t2 - t1, t3 - t2
        label = "3.1.1" if version == 4 else "5"
        print(f"{label:8} {n / enc:10,.0f} {n / dec1:22,.0f} {n / dec2:20,.0f} "
              f"{n / (enc + dec1):16,.0f}")


if __name__ == "__main__":
    main()
