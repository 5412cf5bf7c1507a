"""The device inventory: import, listing, groups, quarantine, credentials, claiming."""
