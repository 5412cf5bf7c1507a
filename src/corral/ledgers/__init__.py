"""Ledgers: JSON documents per owner, product or device, versioned (Particle's Ledger)."""
