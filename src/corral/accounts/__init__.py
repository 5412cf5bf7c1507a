"""Sign-up, login (/oauth/token), the user profile and access tokens."""
