"""The CMAL model: pure torch, no I/O, no distributed code."""
