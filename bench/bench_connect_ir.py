"""B9b: the server's instructions per Particle TCP connect, counted by valgrind's callgrind.

    .venv/bin/python bench/bench_connect_ir.py [--devices 200] [--concurrency 4] [--src DIR]

Wall time and CPU seconds on a shared VM move by ±20 % from run to run (bench/README B9); an
instruction count does not depend on what else the machine is doing, so it compares two
commits, or two machines, where the storm's seconds cannot. ``corral serve`` runs under
``valgrind --tool=callgrind`` (about 50x slower), so the storm is small and gentle: N devices
connect ``concurrency`` at a time (handshake, Hello, admission, both describes), then every
connection is cut and all reconnect. The counters are zeroed after provisioning and after
the cut, and dumped after each phase and a short settle (the presence batches land). The
figure is the server's instructions of the phase, less what an idle server spends in as many
seconds (measured first, over 30 s: timers and periodic jobs, which would otherwise make a
slower run look costlier), divided by the devices connected.

``--src`` runs another checkout's server against this load generator (for example a
``git worktree add --detach /tmp/old <commit>``'s ``src``): the device side and the
provisioning stay the same, only the server changes. Needs Debian's ``valgrind``
(``callgrind_control`` zeroes and dumps the running server).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_particle as bp
from _corral import Corral, corral_serve
from _server import free_port
from cryptography.hazmat.primitives.asymmetric import rsa

from corral.transports.particle.device import ParticleDevice
from corral.transports.particle.keys import load_or_create_server_key

SRC = Path(__file__).resolve().parents[1] / "src"
IDLE_S = 30.0


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=600)


def instructions(dump: str) -> int:
    with open(dump) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"{dump}: no totals line")


async def phases(srv: Corral, port: int, out: str, n: int, concurrency: int,
                 settle_s: float, server_key: rsa.RSAPublicKey
                 ) -> list[tuple[str, int, int, int]]:
    product_id, fleet = await bp.provision(srv.base, n, "connect-ir")
    await asyncio.sleep(settle_s)
    before = set(glob.glob(f"{out}.*"))
    callgrind_control("-z", str(srv.pid))
    t = time.perf_counter()
    await asyncio.sleep(IDLE_S)  # the background work of an idle second (timers, jobs)
    callgrind_control("-d", str(srv.pid))
    idle_per_s = sum(instructions(d) for d in set(glob.glob(f"{out}.*")) - before) / (
        time.perf_counter() - t)
    rows = []
    devices: list[ParticleDevice] = []
    for phase in ("first connect", "reconnect after a cut"):
        if devices:
            await bp.close_all(devices, goodbye=False)
            await asyncio.sleep(settle_s)  # the server has seen every cut
        callgrind_control("-z", str(srv.pid))
        t = time.perf_counter()
        conn = bp.Connector(port, server_key, product_id, concurrency=concurrency, describe=True)
        devices = await conn.connect_all(fleet)
        await asyncio.sleep(settle_s)
        before = set(glob.glob(f"{out}.*"))
        callgrind_control("-d", str(srv.pid))
        dumps = set(glob.glob(f"{out}.*")) - before
        background = idle_per_s * (time.perf_counter() - t)
        rows.append((phase, len(devices), conn.retries,
                     sum(instructions(d) for d in dumps) - int(background)))
        if conn.retry_reasons:  # a retried connect is counted work too: say why it happened
            print(f"retries in '{phase}':", dict(conn.retry_reasons.most_common(5)))
    await bp.close_all(devices)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--src", default=str(SRC), help="the src directory of the server to count")
    a = ap.parse_args()
    # the device side waits for a server ~50x slower than usual
    bp.CONNECT_WITHIN_S, bp.PHASE_LIMIT_S = 600.0, 3600.0
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "callgrind.out")
        server_key = load_or_create_server_key(Path(tmp)).public_key()
        env = {"CORRAL_PARTICLE_PORT": str(port), "PYTHONPATH": str(Path(a.src).resolve())}
        prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        t = time.perf_counter()
        with corral_serve(Path(tmp), extra_env=env, prefix=prefix, start_timeout_s=900) as srv:
            rows = asyncio.run(phases(srv, port, out, a.devices, a.concurrency, a.settle,
                                      server_key))
    print(f"\nserver: {a.src}; {a.devices} devices, {a.concurrency} at a time; "
          f"{time.perf_counter() - t:.0f} s in all")
    print("| phase | devices connected | retries | server instructions (idle rate taken off) "
          "| per connect |")
    print("|---|---:|---:|---:|---:|")
    for phase, ok, retries, ir in rows:
        print(f"| {phase} | {ok:,} | {retries} | {ir:,} | **{ir / max(ok, 1) / 1e6:.1f} M** |")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
