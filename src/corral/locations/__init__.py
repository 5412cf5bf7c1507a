"""Stored device locations (Tracker-style ``loc`` events): each point is a data operation."""
