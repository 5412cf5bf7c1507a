"""Engine and session factories, declarative base, Alembic migrations."""
