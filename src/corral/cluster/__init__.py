"""Many corral nodes as one: the node registry (who holds which sessions, who is alive) and
leases for singleton work. Only active with a bus URL (``CORRAL_BUS_URL``); the single-node
mode never touches it."""
