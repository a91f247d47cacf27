"""Numerical validation of parallel layouts against a single-process reference."""
