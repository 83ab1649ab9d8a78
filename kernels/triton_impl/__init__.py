"""Triton kernels. Imported only through :func:`overdrive.kernels.dispatch.load_triton_module`."""
