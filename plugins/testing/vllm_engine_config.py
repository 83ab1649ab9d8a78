"""Build vLLM engine configs (no engine is started) for a list of ``EngineArgs`` cases.

    python -m overdrive.testing.vllm_engine_config '[{"model": DIR, ...EngineArgs fields}, ...]'

emits, per case, ``"ok"`` or ``"ErrorType: message"``. Defaults: float32, ``max_model_len`` 512. Used by
tests and benchmarks to check which options vLLM (with overdrive's registration) accepts at startup.
"""
from __future__ import annotations

import json
import sys


def main(cases: list[dict]) -> list[str]:
    from vllm.engine.arg_utils import EngineArgs

    out = []
    for case in cases:
        args = {"dtype": "float32", "max_model_len": 512, **case}
        try:
            EngineArgs(**args).create_engine_config()
            out.append("ok")
        except Exception as e:  # noqa: BLE001 - the message is the result
            out.append(f"{type(e).__name__}: {e}")
    return out


if __name__ == "__main__":
    from overdrive.testing.probe import emit

    emit(main(json.loads(sys.argv[1])))
