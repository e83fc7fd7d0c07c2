"""Fixtures live in one module per area; this file only gathers them."""

pytest_plugins = ["fixtures_store", "fixtures_mount", "fixtures_s3", "fixtures_http"]
