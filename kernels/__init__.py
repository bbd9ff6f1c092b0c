"""fxdit's kernels: Triton kernels with validating launchers, and their pure-torch references.

Kernels know nothing of graphs. ``fxdit.kernels.reference`` imports on CPU without Triton.
"""
