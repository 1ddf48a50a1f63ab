"""Positive random features exp(w.x / d^(1/4) - |x|^2 / (2 sqrt d) + log c - shift) in one pass: interface.py over
the backends reference (torch) and triton."""
