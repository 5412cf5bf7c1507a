"""The e-mail outbox: rows written with the change, delivered after commit by a backend."""
