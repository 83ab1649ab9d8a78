"""Entry-point object of the built-in ditfastattn method (work in progress: no methods declared yet)."""
