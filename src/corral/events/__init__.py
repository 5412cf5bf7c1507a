"""Device and cloud events: durable storage (group-committed), queries, retention."""
