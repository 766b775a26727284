"""Shared domain of the serving system: errors, job requests and records, store adapters."""
