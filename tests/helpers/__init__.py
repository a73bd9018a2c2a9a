"""Test helpers: torchrun launcher (dist.py) and the toy engine script it runs."""
