"""Entry-point object of the built-in pmkvq method (work in progress: no methods declared yet)."""
