"""pluggy hook specifications of the ``overdrive`` project.

A plugin is any object (usually a module) with functions marked ``@overdrive.hookimpl``; it is found
through the entry-point group ``overdrive.plugins``::

    [project.entry-points."overdrive.plugins"]
    mymethod = "mypkg.overdrive_plugin"

Hooks are called with keyword arguments only.
"""
from __future__ import annotations

from typing import Any, Sequence

import pluggy

PROJECT = "overdrive"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def overdrive_methods() -> Sequence[Any]:
    """Return the :class:`overdrive.MethodSpec` objects this plugin provides.

    Must be cheap: it runs in every engine process that loads overdrive. Keep implementations lazy
    (``MethodSpec(impl="pkg.mod:Impl")``).
    """


@hookspec
def overdrive_cli_commands() -> Sequence[Any]:
    """Return :class:`overdrive.cli.Command` objects: extra top-level ``overdrive`` subcommands.

    Method-specific verbs shared by many methods (``quantize``, ``calibrate``) are declared on the
    method instead (``MethodSpec.commands``), so they appear as ``overdrive quantize --method NAME``.
    """
