"""The benchmark harness behind ``fastpeft bench``: micro (per op) and end-to-end cases, timed on CUDA with
events and on CPU with the wall clock (clearly labelled), written as a table, JSON and PNG plots.

``cases`` holds the registry, ``timing`` the clocks and memory, ``roofline`` the device's measured
limits, ``report`` the outputs; ``__main__`` is the command line.
"""
