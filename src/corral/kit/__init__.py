"""Domain-free helpers: errors, clock, identifiers and secrets, passwords, text."""
