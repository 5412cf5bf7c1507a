"""Cohorts (Peridio): a product's exclusive device segments, each a release target."""
