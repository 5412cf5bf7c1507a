"""Product firmware: uploads, releases, targeting, per-device update state, signing."""
