"""Audience Server: receive audience segments in batches, prove them whole, forward once."""

__version__ = "0.1.0"
