"""Benchmark helpers: plots of ETTR, snapshot stalls and recovery phases (needs matplotlib).

Nothing here is imported by the package at import time; import the submodules explicitly.
"""
