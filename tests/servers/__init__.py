"""Helpers for tests/test_server.py: a KServe server subprocess and a fault-injecting proxy."""
