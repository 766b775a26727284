"""Celery workers: CPU triage and GPU generation. Tasks are thin glue over plain functions."""
