"""Triton kernels and their launchers (imported lazily by `uniref.ops`: triton is optional on CPU-only
installs). Each module holds the kernels of one concept and the functions that launch them; op
registration, validation and autograd live in `uniref.ops`.
"""
