"""What the Gen 3 (DTLS/UDP) gateway keeps in the database: each DTLS session bound to a
device, so that a device resumes it (Device OS resumes with no handshake, and may skip its
Hello) after corral restarted, or on another node."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base


class ParticleUdpSession(Base):
    """One DTLS session by its connection ID (hex): the epoch-1 keys, our next sequence
    number (reserved ahead, so none is ever sent twice), the replay window, the device it is
    bound to, that device's Hello and its subscriptions (``state``, see
    :mod:`corral.transports.particle.udp`)."""

    __tablename__ = "particle_udp_sessions"

    cid: Mapped[str] = mapped_column(String(16), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(24), index=True)
    state: Mapped[dict[str, Any]]
    updated_at: Mapped[dt.datetime]
