"""Helpers that start real peers (Rspamd, ...) on loopback for integration tests."""
