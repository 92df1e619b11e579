"""Emulated platform devices (port I/O)."""
