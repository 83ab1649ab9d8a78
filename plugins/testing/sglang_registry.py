"""SGLang's real plugin loader in a fresh process; emits what landed in its registries.

    python -m overdrive.testing.sglang_registry

emits ``{"quantization": [overdrive methods in QUANTIZATION_METHODS], "choices": [those in the
--quantization choices]}``.
"""
from __future__ import annotations


def main() -> dict:
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.layers import quantization as q
    from sglang.srt.plugins import load_plugins

    load_plugins()
    ours = sorted(n for n, cls in q.QUANTIZATION_METHODS.items() if getattr(cls, "overdrive_method", None))
    return {"quantization": ours, "choices": [n for n in ours if n in QUANTIZATION_CHOICES]}


if __name__ == "__main__":
    from overdrive.testing.probe import emit

    emit(main())
