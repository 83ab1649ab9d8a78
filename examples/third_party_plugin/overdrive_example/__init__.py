"""Example overdrive plugin package (see README.md)."""
