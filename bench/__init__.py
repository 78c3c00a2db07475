"""Benchmarks (run as scripts: python bench/conv.py); not part of the installed package."""
