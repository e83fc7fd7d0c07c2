"""Fixtures for this area (placeholder)."""
