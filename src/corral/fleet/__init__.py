"""Fleet health: device vitals (Particle's diagnostics), per-minute and hourly rollups of
what the fleet does, and the metrics routes that read them."""
