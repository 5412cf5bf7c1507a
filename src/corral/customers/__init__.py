"""Product customers: end users who claim and use their own devices."""
