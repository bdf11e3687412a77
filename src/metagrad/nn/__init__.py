"""Quantized layers, their autograd functions, and the conversion of any model (quantize_)."""
