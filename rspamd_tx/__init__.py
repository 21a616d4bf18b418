"""rspamd-tx: Rspamd's proxy and fuzzy-storage workers on Twisted."""

__version__ = "0.1.0"
