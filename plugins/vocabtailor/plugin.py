"""Entry-point object of the built-in VocabTailor method (cheap: imports no engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import VocabTailorConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="vocabtailor", kind=Kind.VOCAB, config_cls=VocabTailorConfig,
        paper="VocabTailor: Dynamic Vocabulary Selection for Downstream Tasks in Small Language Models "
              "(AwakenedInsects/VocabTailor)",
        impl="overdrive.vocabtailor.method:METHOD",
        summary="embedding kept off the accelerator; LM head over static task set + prompt + special tokens",
        commands={"calibrate": MethodCommand(
            help="profile a task corpus into a VocabTailor vocabulary profile (static set, special tokens, model identity)",
            add_arguments="overdrive.vocabtailor.cli:add_arguments",
            run="overdrive.adapters.transformers.vocab:calibrate_command")},
    )]
