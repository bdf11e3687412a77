"""Settings of a small training run on the built-in digits, shared by the tests that train one.

Compiled kernels are off: they are tested in test_kernels.py and by the CIFAR-10 runs, and here
would only add compile time.
"""

DIGITS = {
    "model": "small_cnn",
    "data": "digits",
    "batch_size": 64,
    "progress": False,
    "compile": "off",
}
