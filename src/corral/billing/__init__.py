"""Subscriptions, payments and invoices of organizations (see docs/billing.md)."""
