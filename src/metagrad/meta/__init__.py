"""MetaGrad: hypernetworks, the optimizer and its base rules, gradient diagnostics."""
