"""A training run: settings and flags, tasks, the trainer, run records and files, the launcher."""
