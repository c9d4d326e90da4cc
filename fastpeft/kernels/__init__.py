"""Triton kernels and their launchers, one file per kernel family. Nothing here knows about nn modules."""
