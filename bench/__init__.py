"""Benchmarks for webhookd (`make bench`); not part of the test suite."""
