"""The package as pip builds and installs it: what the sdist holds, builds that follow their
switches, a RUNPATH free of build-machine paths, and the messages a first install meets
(missing extras, --version, help(mos), third-party import noise). The full path (sdist and
manylinux wheel installed into fresh venvs) is scripts/check_package.sh, run by `make test`."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

import mos

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, env=None, cwd=None):
    """Runs `code` in a fresh interpreter with this tree's mos first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=300)


def test_sdist_holds_every_build_input_and_the_license(tmp_path):
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--outdir", str(tmp_path), "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = tmp_path.glob("mixture_of_shards-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    build_inputs = {str(p.relative_to(ROOT)) for folder in ("csrc", "cuda") for p in (ROOT / folder).iterdir()
                    if p.is_file()}
    assert {"csrc/args.h", "csrc/cpu_kernels.inc", "cuda/kernels.cu"} <= build_inputs
    assert build_inputs - names == set()
    assert {"LICENSE", "pyproject.toml", "setup.py", "mos/py.typed", "tests/conftest.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def _build(tmp_path, **switches):
    """setup.py build_ext into tmp_path (CPU-only); returns (compiler output, the build record, .so)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOS_")}
    env.update(MOS_CUDA="0", **switches)
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
                          "--build-lib", str(tmp_path / "lib")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lib = tmp_path / "lib" / "mos"
    (so,) = lib.glob("_C*.so")
    return out.stdout + out.stderr, json.loads((lib / "_build.json").read_text()), so


def runpath(so):
    with open(so, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, DynamicSection):
                return [t.runpath for t in section.iter_tags() if t.entry.d_tag == "DT_RUNPATH"]
    return []


def test_a_changed_switch_rebuilds_and_werror_is_opt_in(tmp_path):
    log, record, so = _build(tmp_path)
    assert "module.c" in log and "-Werror" not in log and record["debug"] is False
    assert runpath(so) == ["$ORIGIN/../scipy_openblas32/lib"]  # no build-machine or Python lib path

    log, record, _ = _build(tmp_path)
    assert "module.c" not in log  # same switches, nothing changed: nothing compiled

    log, record, _ = _build(tmp_path, MOS_DEBUG="1", MOS_WERROR="1")
    assert "module.c" in log and "-O0" in log and "-Werror" in log and record["debug"] is True



def test_a_cpu_only_fallback_says_so_at_import():
    with pytest.warns(RuntimeWarning, match=r"built CPU-only although nvcc was found \(/opt/cuda/bin/nvcc\)"):
        mos._warn_if_cpu_only_fallback({"cuda_mode": "auto", "nvcc": "/opt/cuda/bin/nvcc", "cuda_built": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mos._warn_if_cpu_only_fallback({"cuda_mode": "auto", "nvcc": "/opt/cuda/bin/nvcc", "cuda_built": True})
        mos._warn_if_cpu_only_fallback({"cuda_mode": "0", "nvcc": "", "cuda_built": False})
        mos._warn_if_cpu_only_fallback({})


def test_build_info_reports_the_build_switches():
    build = mos.build_info()["build"]
    assert set(build) >= {"cuda_mode", "nvcc", "cuda_built", "debug", "sanitize"}
    assert isinstance(build["cuda_built"], bool) and build["cuda_mode"] in ("auto", "0", "1")


BLOCK = "import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None  # as if not installed\n"


@pytest.mark.parametrize("blocked, code, extra", [
    (["torch"], "import mos; mos.MoSModel", "torch"),
    (["torch"], "import mos; hasattr(mos, 'get_mos_model')", "torch"),
    (["torch"], "import mos.torch", "torch"),
    (["safetensors"], "import mos.torch", "torch"),
    (["transformers"], "import mos; mos.MoSTrainer", "hf"),
])
def test_a_missing_optional_dependency_names_its_extra(blocked, code, extra):
    out = run_python(BLOCK.format(blocked=blocked) + code)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mos._extras.MissingExtraError: ")
    assert f"needs {blocked[0]}, which is not installed: pip install 'mixture-of-shards[{extra}]'" in last


def test_the_command_line_names_the_extra(tmp_path):
    out = run_python(BLOCK.format(blocked=["torch"]) + "from mos.__main__ import main\n"
                     "sys.exit(main(['serve-demo', '--adapters', '1']))", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: `mos serve-demo` needs torch, which is not installed: "
                                  "pip install 'mixture-of-shards[torch]'")


def test_the_pytest_fixtures_name_the_extra(tmp_path):
    (tmp_path / "conftest.py").write_text(BLOCK.format(blocked=["torch"]))
    (tmp_path / "test_fixture.py").write_text("def test_uses_tiny_llama(tiny_llama):\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert "MissingExtraError: the mos pytest fixtures needs torch" in out.stdout
    assert "pip install 'mixture-of-shards[torch]'" in out.stdout


def test_version_flag(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mos", "--version"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"mos {mos.__version__} (CPU (")
    assert "torch" not in run_python("import sys; from mos.__main__ import version_line; version_line(); "
                                     "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
                                     ).stdout.replace("[]", "")


def test_help_lists_the_public_api_without_importing_torch():
    out = run_python("""
        import pydoc, sys
        sys.modules["torch"] = None  # help(mos) works where torch is not installed
        import mos
        print(pydoc.render_doc(mos, renderer=pydoc.plaintext))
    """)
    assert out.returncode == 0, out.stderr
    for name in [*mos.__all__, "mos.torch", "mos.testing", "__version__", "--version"]:
        assert name in out.stdout, name


def test_the_bitsandbytes_kernels_notice_is_dropped_and_nothing_else():
    code = """
        import logging, mos
        log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        log.warning("another bitsandbytes message")
    """
    quiet = run_python(code)
    assert quiet.returncode == 0 and quiet.stderr.strip() == "another bitsandbytes message"
    verbose = run_python(code, env={"MOS_VERBOSE_IMPORTS": "1"})
    assert "Failed to load CPU gemm_4bit_forward" in verbose.stderr


def test_editable_install_prints_no_setuptools_notice(tmp_path):
    from pyproject_hooks import BuildBackendHookCaller

    output = []

    def runner(cmd, cwd=None, extra_environ=None):
        env = {**os.environ, **(extra_environ or {}), "MOS_CUDA": "0", "MOS_DEBUG": "1"}  # -O0: quick
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        output.append(done.stdout + done.stderr)
        done.check_returncode()

    # An editable build compiles in place: a copy of the tree keeps this checkout's extension as it is.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    hooks = BuildBackendHookCaller(str(source), "setuptools.build_meta", runner=runner,
                                   python_executable=sys.executable)
    wheel = hooks.build_editable(str(tmp_path / "out"))
    assert wheel.startswith("mixture_of_shards-") and wheel.endswith(".whl")
    assert "Editable installation" not in output[0] and "Please be careful with folders" not in output[0]


def _requirement_names(specs):
    return {re.split(r"[<>=!\[ ;]", spec, maxsplit=1)[0].lower() for spec in specs}


def test_extras_fit_the_ecosystem_and_match_the_import_hints():
    import tomllib

    from mos._extras import DISTRIBUTION, EXTRA_OF

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == DISTRIBUTION
    assert "setuptools>=77" in project["build-system"]["requires"]  # the SPDX license string
    extras = project["project"]["optional-dependencies"]
    assert "torch>=2.4" in extras["torch"] and not any(s.startswith("torch==") for e in extras.values() for s in e)

    def closure(extra):  # an extra's requirements, with the extras it names (mixture-of-shards[torch])
        names = set()
        for spec in extras[extra]:
            match = re.fullmatch(rf"{DISTRIBUTION}\[(\w+)\]", spec)
            names |= closure(match.group(1)) if match else _requirement_names([spec])
        return names

    assert {"torch", "safetensors"} <= closure("torch")
    assert {"torch", "safetensors", "transformers", "peft"} <= closure("hf")
    for module, extra in EXTRA_OF.items():  # the ImportError names an extra that does install it
        assert module in closure(extra), (module, extra)
