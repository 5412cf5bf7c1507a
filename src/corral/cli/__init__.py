"""The ``corral`` command: ``serve``, ``admin`` (local database tasks) and REST API clients."""
