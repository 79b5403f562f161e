"""Hydra entry points (train, attribute), the command line, and the HTML report."""
