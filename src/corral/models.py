"""The registry of every domain's tables, at the composition root.

``db/`` knows the declarative base, not the domains; whoever needs the whole schema (the
app, the CLI's database commands, Alembic when it compares, the tests) calls :func:`load`,
which imports every ``models`` module so ``Base.metadata`` holds every table. A new domain
with tables adds its ``models`` module here.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from corral.accounts import models as _accounts  # noqa: F401
from corral.audit import models as _audit  # noqa: F401
from corral.auth import models as _auth  # noqa: F401
from corral.billing import models as _billing  # noqa: F401
from corral.cluster import models as _cluster  # noqa: F401
from corral.db.base import Base
from corral.devices import cohort_models as _cohorts  # noqa: F401
from corral.devices import models as _devices  # noqa: F401
from corral.events import models as _events  # noqa: F401
from corral.firmware import models as _firmware  # noqa: F401
from corral.fleet import models as _fleet  # noqa: F401
from corral.integrations import models as _integrations  # noqa: F401
from corral.ledgers import models as _ledgers  # noqa: F401
from corral.ledgers import sync_models as _ledger_sync  # noqa: F401
from corral.locations import models as _locations  # noqa: F401
from corral.mail import models as _mail  # noqa: F401
from corral.metering import models as _metering  # noqa: F401
from corral.orgs import models as _orgs  # noqa: F401
from corral.products import models as _products  # noqa: F401
from corral.rollouts import models as _rollouts  # noqa: F401
from corral.transports.particle import models as _particle  # noqa: F401


def load() -> MetaData:
    """Every table of corral (the imports above registered them on ``Base.metadata``)."""
    return Base.metadata
