"""Integrations of the blocking client with other frameworks (Django's cache)."""
