"""Phased rollouts of a firmware release: a sticky share of its devices, paused by failures."""
