"""Several processes under torchrun: process groups, collectives, quantized communication."""
