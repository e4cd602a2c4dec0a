"""Shipped test tooling: fault plans and multi-process launch helpers."""
