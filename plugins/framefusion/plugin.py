"""Entry-point object of the built-in framefusion method (work in progress: no methods declared yet)."""
