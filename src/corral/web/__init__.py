"""The FastAPI application: composes every domain's routes, errors, metrics and health."""
