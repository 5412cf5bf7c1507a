"""Credentials -> Subject, and the one policy that answers "may this subject do this"."""
