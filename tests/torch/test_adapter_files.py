"""Adapter files meet other writers: a load while another process saves reads one save whole;
export_lora touches only the files it writes, never a directory anyone may stand in, never a
special file."""
import json
import os
import signal
import threading
import time

import pytest
import torch

from mos.torch import get_mos_model
from mos.torch.files import read_adapter
from torch_helpers import make_llama, mos_config, randomize_pools


def _save_in_a_loop(models, directory):
    """Forks a child that saves the models into `directory` in turn, forever; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                for model in models:
                    model.save_pretrained(directory)
        finally:
            os._exit(1)
    return pid


def test_load_while_another_process_saves_reads_one_save_whole(tmp_path):
    # Two adapters that differ in lora_alpha and pool values only: a config from one save paired
    # with the other save's tensors would load without complaint.
    models = []
    for alpha, seed in ((8.0, 1), (32.0, 2)):
        model = get_mos_model(make_llama(), mos_config(lora_alpha=alpha))
        randomize_pools(model, seed=seed)
        models.append(model)
    signature = {m.peft_config["default"].lora_alpha: m.mos_pools["default"]["q_proj"].pool_a.detach().clone()
                 for m in models}
    directory = str(tmp_path / "adapter")
    models[0].save_pretrained(directory)
    pid = _save_in_a_loop(models, directory)
    mixed = reads = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            files = read_adapter(directory)
            reads += 1
            want = signature[files.config.lora_alpha]
            if not torch.equal(files.tensors["q_proj.pool_a"], want):
                mixed += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert reads > 50
    assert mixed == 0, f"{mixed} of {reads} loads paired one save's config with another save's tensors"


@pytest.fixture(scope="module")
def adapter():
    model = get_mos_model(make_llama(), mos_config())
    randomize_pools(model)
    return model


def test_export_keeps_files_another_process_writes_meanwhile(adapter, tmp_path):
    directory = tmp_path / "lora"
    adapter.export_lora(str(directory))
    written, stop = [], threading.Event()

    def log_writer():  # another program logging into the same directory
        for k in range(2000):
            if stop.is_set():
                return
            path = directory / f"log-{k}.txt"
            try:
                path.write_text(f"{k}\n")
            except FileNotFoundError:  # the directory was briefly absent
                continue
            written.append(path)
            time.sleep(0.001)

    thread = threading.Thread(target=log_writer)
    thread.start()
    try:
        for _ in range(20):
            adapter.export_lora(str(directory))
    finally:
        stop.set()
        thread.join()
    lost = [p.name for p in written if not p.exists()]
    assert len(written) > 20
    assert lost == [], f"{len(lost)} of {len(written)} files written during the exports were deleted"


def test_export_into_the_working_directory_keeps_it(adapter, tmp_path, monkeypatch):
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    before = os.stat(".").st_ino
    adapter.export_lora(".")
    adapter.export_lora(str(tmp_path / "outer"))  # a directory that contains the working directory
    assert os.path.exists(os.getcwd()), "the working directory was removed"
    assert os.stat(os.getcwd()).st_ino == before
    assert sorted(os.listdir(".")) == ["adapter_config.json", "adapter_model.safetensors"]
    with open("adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"


def test_export_never_opens_special_files(adapter, tmp_path):
    directory = tmp_path / "lora"
    directory.mkdir()
    os.mkfifo(directory / "events.fifo")  # opening it to read would block until a writer comes
    done = []
    thread = threading.Thread(target=lambda: (adapter.export_lora(str(directory)), done.append(True)),
                              daemon=True)
    thread.start()
    thread.join(timeout=20)
    if not done:  # unblock the hung export so the daemon thread can end
        fd = os.open(directory / "events.fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert done, "export_lora blocked on a named pipe in its directory"
    assert (directory / "adapter_model.safetensors").is_file()
    assert (directory / "events.fifo").exists()


def test_export_refuses_to_replace_what_is_not_a_regular_file(adapter, tmp_path):
    directory = tmp_path / "lora"
    (directory / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="adapter_config.json: not a regular file"):
        adapter.export_lora(str(directory))
    assert (directory / "adapter_config.json").is_dir()
