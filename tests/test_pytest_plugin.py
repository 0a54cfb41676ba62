"""The mos pytest plugin: registered through the pytest11 entry point, its option and marker, and
pytest still working where torch cannot be imported."""
import subprocess
import sys
import textwrap

import pytest

import mos.testing.plugin as plugin

PROBE = textwrap.dedent("""
    import sys
    import pytest

    @pytest.mark.gpu
    def test_needs_gpu():
        import torch
        assert torch.cuda.is_available()

    def test_device(mos_device):
        assert mos_device in ("cpu", "cuda")
        print("DEVICE", mos_device)

    def test_record(mos_record):
        mos_record(loss=0.125, params=96)
""")


def test_plugin_is_active_through_the_entry_point(request):
    assert request.config.pluginmanager.get_plugin("mos") is plugin
    assert request.config.getoption("--mos-device") in ("cpu", "cuda")


def test_gpu_marker_and_device_option(pytester):
    pytester.makepyfile(test_probe=PROBE)
    has_cuda = plugin.cuda_available()
    result = pytester.runpytest("-s", "-rs")
    result.assert_outcomes(passed=3 if has_cuda else 2, skipped=0 if has_cuda else 1)
    result.stdout.fnmatch_lines(["*DEVICE cpu", "*mos results*", "test_record*0.125*96"])
    cuda = pytester.runpytest("--mos-device", "cuda", "-rs")
    cuda.assert_outcomes(passed=3 if has_cuda else 1, skipped=0 if has_cuda else 2)
    wrong = pytester.runpytest("--mos-device", "tpu")
    assert wrong.ret != 0 and "invalid choice" in str(wrong.stderr)


def test_pytest_runs_with_the_plugin_where_torch_cannot_be_imported(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    code = ("import sys; sys.modules['torch'] = None; import pytest, mos; "
            "rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', %r]); "
            "print('TORCH', sys.modules['torch']); sys.exit(rc)" % str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed, 1 skipped" in run.stdout and "TORCH None" in run.stdout
