"""The ``overdrive`` command: ``list``, ``doctor``, and the verbs methods add (``quantize``, ``calibrate``, ``export``,
``generate``).

A method declares verbs in ``MethodSpec.commands``; ``overdrive VERB --method NAME [options]`` then
parses the method's own options (``overdrive VERB --method NAME --help`` lists them). Plugins may add
whole top-level commands through the ``overdrive_cli_commands`` hook.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata as md
import json
import platform
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .benchmarks import package_versions
from .kinds import Kind
from .registry import UnknownMethodError, get_registry

#: verbs every method may serve; shown even when no installed method serves them yet
SHARED_VERBS = {
    "quantize": "quantize a model offline into an overdrive checkpoint (--method NAME)",
    "calibrate": "calibrate a method and write its plan JSON (--method NAME)",
    "export": "convert a method's checkpoint to another format (--method NAME)",
    "generate": "run a pipeline with a method and write its output (--method NAME)",
}


@dataclasses.dataclass(frozen=True)
class Command:
    """A top-level command contributed by a plugin (``overdrive_cli_commands`` hook)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------------------- list
def methods_matrix() -> dict[str, Any]:
    """Methods x frameworks, derived from each method's kind and the adapters' contracts."""
    from overdrive.adapters import ADAPTERS

    statuses = {a.framework: a.status() for a in ADAPTERS}

    def cell(kind: Kind, framework: str) -> str:
        st = statuses[framework]
        if kind not in st.adapter.kinds:
            return "-"
        return {"ok": "yes", "not installed": "not installed", "untested version": "untested version"}[st.state]

    reg = get_registry()
    return {
        "frameworks": {f: {"version": s.version, "state": s.state, "tested": s.adapter.tested,
                           "surface": s.adapter.surface} for f, s in statuses.items()},
        "kinds": {k.value: {f: cell(k, f) for f in statuses} for k in Kind},
        "methods": [{"name": s.name, "kind": s.kind.value, "plugin": s.plugin, "paper": s.paper,
                     "summary": s.summary, "frameworks": {f: cell(s.kind, f) for f in statuses}}
                    for s in reg.methods()],
        "failed_plugins": [dataclasses.asdict(f) for f in reg.failures],
    }


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    m = methods_matrix()
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    fws = list(m["frameworks"])
    if m["methods"]:
        rows = [["method", "kind", *fws, "plugin"]]
        rows += [[x["name"], x["kind"], *[x["frameworks"][f] for f in fws], x["plugin"]] for x in m["methods"]]
        print(_table(rows))
    else:
        print("No methods installed (no plugin in entry-point group 'overdrive.plugins' provides one).")
    print("\nKinds x frameworks (what any method of a kind reaches):")
    print(_table([["kind", *fws]] + [[k, *[v[f] for f in fws]] for k, v in m["kinds"].items()]))
    for f in m["failed_plugins"]:
        print(f"\nWARNING: plugin {f['plugin']!r} ({f['target']}) failed to load: {f['error']}")
    return 0


# --------------------------------------------------------------------------------------- doctor
def doctor_report(try_register: bool = True) -> dict[str, Any]:
    from overdrive.adapters import ADAPTERS

    report: dict[str, Any] = {
        "overdrive": __version__,
        "python": platform.python_version(),
        "packages": package_versions(),
        "frameworks": {}, "problems": [],
    }
    reg = get_registry()
    report["methods"] = reg.names()
    for f in reg.failures:
        report["problems"].append(f"plugin {f.plugin!r} ({f.target}, distribution {f.distribution!r}) "
                                  f"failed to load: {f.error}")
    eps = {g: sorted(ep.name for ep in md.entry_points(group=g))
           for g in ("vllm.general_plugins", "sglang.srt.plugins")}
    for a in ADAPTERS:
        st = a.status()
        entry: dict[str, Any] = {"version": st.version, "state": st.state, "tested": a.tested,
                                 "surface": a.surface, "message": st.describe()}
        group = a.surface.removeprefix("entry point ") if a.surface.startswith("entry point") else None
        if group is not None:
            entry["entry_point_visible"] = "overdrive" in eps.get(group, [])
            if st.version is not None and not entry["entry_point_visible"]:
                report["problems"].append(f"{a.framework}: entry point {group} 'overdrive' is not visible; "
                                          "reinstall overdrive (pip install -e . or pip install overdrive)")
        if st.state == "untested version":
            report["problems"].append(st.describe())
        if try_register and st.usable:
            try:
                mod = importlib.import_module(a.module)
                if hasattr(mod, "_register"):  # adapters with a registry to register into
                    entry["registers"] = mod._register()[0]
            except Exception as e:  # noqa: BLE001 - doctor reports, it does not crash
                entry["registers"] = None
                report["problems"].append(f"{a.framework}: registration failed: {type(e).__name__}: {e}")
        report["frameworks"][a.framework] = entry
    try:
        from overdrive import kernels

        import torch

        report["kernel_backend"] = {
            "cpu": kernels.active_backend("cpu"),
            "cuda": kernels.active_backend("cuda") if torch.cuda.is_available() else "no CUDA device",
        }
    except Exception as e:  # noqa: BLE001
        report["kernel_backend"] = None
        report["problems"].append(f"kernels: {type(e).__name__}: {e}")
    try:
        report["weight_formats"] = weight_format_paths(
            vllm=try_register and report["frameworks"].get("vllm", {}).get("state") == "ok")
    except Exception as e:  # noqa: BLE001
        report["weight_formats"] = None
        report["problems"].append(f"weight formats: {type(e).__name__}: {e}")
    return report


def weight_format_paths(vllm: bool = True) -> dict[str, Any]:
    """Which kernel serves each standard weight format on this machine (bf16 activations, a 4096 x 4096
    layer): vLLM's own kernel when the vLLM adapter would hand layers to it, else overdrive's, and whether
    that is a fast path (a packed GEMM) or a dequantize-per-call fallback."""
    import torch

    from overdrive.contracts import WeightFormat
    from overdrive.kernels.cpu_packed import cpu_features, use_packed

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fmts = [WeightFormat(4, 128, True), WeightFormat(3, 128, True), WeightFormat(8, None, False, 8),
            WeightFormat(4, None, False, 8)]
    out: dict[str, Any] = {"device": dev, "cpu": cpu_features().describe(), "formats": {}}
    for f in fmts:
        if dev == "cuda":
            own = "overdrive Triton kernels (fast)"
        else:
            why = use_packed("cpu", torch.bfloat16, 4096, 4096)
            own = ("overdrive: torch packed CPU GEMM (fast)" if why is None
                   else f"overdrive: dequantize per call (slow: {why})")
        row: dict[str, Any] = {"overdrive": own}
        if vllm:
            from overdrive.adapters.vllm.linear_kernels import choose

            c = choose(f, torch.bfloat16, (4096, 4096), (4096, 4096))
            row["vllm"] = (f"vLLM {c.name}" + (f" (only layers with |code| <= {c.max_code}: {c.reason})"
                                                if c.max_code is not None else "")
                           if c.kernel is not None else f"overdrive's kernel ({c.reason})")
        out["formats"][f.describe()] = row
    return out


def cmd_doctor(args: argparse.Namespace) -> int:
    r = doctor_report(try_register=not args.no_register)
    if args.json:
        print(json.dumps(r, indent=2))
        return 1 if r["problems"] else 0
    print(f"overdrive {r['overdrive']} on Python {r['python']}")
    print("\npackages:")
    for name, v in r["packages"].items():
        print(f"  {name:13s} {v or 'not installed'}")
    print("\nframeworks:")
    for f, e in r["frameworks"].items():
        line = f"  {f:13s} {e['message']}"
        if "entry_point_visible" in e and e["version"]:
            line += f"; entry point {'visible' if e['entry_point_visible'] else 'MISSING'}"
        if "registers" in e:
            line += "; registers: " + (", ".join(e["registers"]) or "(no methods of its kinds)"
                                        if e["registers"] is not None else "FAILED")
        print(line)
    kb = r["kernel_backend"]
    if kb:
        print(f"\nkernels: CPU tensors -> {kb['cpu']}; CUDA tensors -> {kb['cuda']}")
    wf = r.get("weight_formats")
    if wf:
        print(f"\nweight formats (bf16 activations, {wf['device']}; CPU {wf['cpu']}):")
        for name, row in wf["formats"].items():
            print(f"  {name:28s} {row['overdrive']}")
            if "vllm" in row:
                print(f"  {'':28s} vLLM --quantization: {row['vllm']}")
    print(f"\nmethods: {', '.join(r['methods']) or '(none installed)'}")
    if r["problems"]:
        print("\nproblems:")
        for p in r["problems"]:
            print(f"  - {p}")
        return 1
    print("\nno problems found")
    return 0


# ------------------------------------------------------------------------------- method verbs
def _run_method_verb(verb: str, argv: Sequence[str]) -> int:
    reg = get_registry()
    serving = [s for s in reg.methods() if verb in s.commands]
    pre = argparse.ArgumentParser(prog=f"overdrive {verb}", add_help=False)
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    names = ", ".join(s.name for s in serving) or "(no installed method serves it)"
    if known.method is None:
        p = argparse.ArgumentParser(prog=f"overdrive {verb}", description=SHARED_VERBS.get(verb, verb))
        p.add_argument("--method", required=True, help=f"one of: {names}")
        p.parse_args(argv)  # prints help / the missing-option error and exits
        return 2
    try:
        spec = reg.get(known.method)
    except UnknownMethodError as e:
        print(f"overdrive {verb}: {e}", file=sys.stderr)
        return 2
    if verb not in spec.commands:
        print(f"overdrive {verb}: method {spec.name!r} has no '{verb}' step; methods with one: {names}",
              file=sys.stderr)
        return 2
    add_arguments, run = spec.commands[verb].resolve()
    p = argparse.ArgumentParser(prog=f"overdrive {verb} --method {spec.name}",
                                description=spec.commands[verb].help)
    p.add_argument("--method", required=True)
    add_arguments(p)
    args = p.parse_args(argv)
    return _run_reporting_config_errors(f"overdrive {verb}", run, args)


def _run_reporting_config_errors(prog: str, run: Callable[[argparse.Namespace], int],
                                 args: argparse.Namespace) -> int:
    """Run a verb; a :class:`ConfigError` (bad user input) becomes one line on stderr and exit status 2.

    Verbs write their outputs atomically, so an error leaves nothing behind. Other exceptions are
    bugs and keep their traceback.
    """
    from .config import ConfigError

    try:
        return int(run(args) or 0)
    except ConfigError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message's own line breaks
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------- main
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    p = argparse.ArgumentParser(prog="overdrive", description="overdrive: efficient-inference methods as engine plugins")
    p.add_argument("--version", action="version", version=f"overdrive {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    lp = sub.add_parser("list", help="methods x frameworks matrix")
    lp.add_argument("--json", action="store_true")
    dp = sub.add_parser("doctor", help="versions found, adapter registration, kernel backend, problems")
    dp.add_argument("--json", action="store_true")
    dp.add_argument("--no-register", action="store_true", help="do not import the engines to try registration")
    for verb, help_ in SHARED_VERBS.items():
        sub.add_parser(verb, help=help_, add_help=False)
    extra: dict[str, Command] = {}
    for c in get_registry().cli_commands():
        if c.name in ("list", "doctor", *SHARED_VERBS) or c.name in extra:
            print(f"overdrive: ignoring plugin command {c.name!r}: the name is taken", file=sys.stderr)
            continue
        c.add_arguments(sub.add_parser(c.name, help=c.help))
        extra[c.name] = c
    return p, extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SHARED_VERBS:
        return _run_method_verb(argv[0], argv[1:])
    parser, extra = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list(args)
    if args.command == "doctor":
        return cmd_doctor(args)
    if args.command in extra:
        return _run_reporting_config_errors(f"overdrive {args.command}", extra[args.command].run, args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
