"""Producers: the Python client, the HTTP API and the CLI that web backends use."""
