"""Builds mos._C from csrc/*.c, and mos/_mos_cuda.so from cuda/*.cu when CUDA is on.

Switches (environment variables):
  MOS_CUDA     auto (default: build CUDA when nvcc is found) | 0 | 1 (fail without nvcc)
  MOS_SANITIZE 1 builds with -fsanitize=address,undefined (run with LD_PRELOAD of libasan)
  MOS_DEBUG    1 builds with -O0 -g
  MOS_WERROR   1 turns compiler warnings into errors (our CI, through scripts/setup.sh; users'
               builds never fail on a newer compiler's warning)
  MOS_CUDA_ARCHS  compute capabilities to build, e.g. "90" or "80,90" (default: 80 and 90, plus
               compute_90 PTX for newer GPUs); one architecture builds about three times faster
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import scipy_openblas32
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent.resolve()

# `pip install -e .` would print setuptools' boxed notice that a folder named like the package
# may shadow it; here that folder (mos/) is the package the editable install points at.
warnings.filterwarnings("ignore", message="Editable installation")
DEFAULT_CUDA_ARCHS = "80,90"


def cuda_archs():
    """nvcc -gencode flags: machine code for each of MOS_CUDA_ARCHS (default 80,90) and PTX of the newest."""
    chosen = os.environ.get("MOS_CUDA_ARCHS", "").replace(" ", "") or DEFAULT_CUDA_ARCHS
    archs = chosen.split(",")
    if not all(a.isdigit() for a in archs):
        sys.exit(f"MOS_CUDA_ARCHS must be compute capabilities like 90 or 80,90, got {chosen!r}")
    flags = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    newest = max(archs, key=int)
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def flag(name, default="0"):
    return os.environ.get(name, default).strip().lower()


def find_nvcc():
    """(nvcc, cuda_home): CUDA_HOME's nvcc first, else the one on PATH (which may be a wrapper)."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc"), Path(home)
    nvcc = shutil.which("nvcc")
    return (nvcc, Path(nvcc).resolve().parent.parent) if nvcc else (None, None)


def cuda_setting():
    mode = flag("MOS_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MOS_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc, home = find_nvcc() if mode != "0" else (None, None)
    if mode == "1" and not nvcc:
        sys.exit("MOS_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc, home


def find_cublas(cuda_home):
    """(include_dir, lib_dir, link_name) of cuBLAS: the toolkit's own, else the nvidia-cublas wheel."""
    for inc, lib in ((cuda_home / "include", cuda_home / "lib64"), (cuda_home / "include", cuda_home / "lib")):
        if (inc / "cublas_v2.h").exists() and (lib / "libcublas.so").exists():
            return inc, lib, "cublas"
    try:
        import nvidia.cu13 as wheel  # the nvidia-cublas wheel (CUDA 13 layout)
    except ImportError:
        return None
    root = Path(list(wheel.__path__)[0])
    libs = sorted((root / "lib").glob("libcublas.so.*"))
    if (root / "include" / "cublas_v2.h").exists() and libs:
        return root / "include", root / "lib", ":" + libs[0].name
    return None


def c_flags():
    flags = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if flag("MOS_WERROR") == "1":
        flags += ["-Werror"]
    if flag("MOS_DEBUG") == "1":
        flags += ["-O0", "-g", "-DMOS_DEBUG=1"]
    else:
        flags += ["-O3"]
    if flag("MOS_SANITIZE") == "1":
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    return flags


CUDA_LIBRARY = "_mos_cuda.so"  # the CUDA back end, next to mos._C, opened by it at run time
# Where a CUDA build of torch puts the CUDA runtime and cuBLAS, relative to mos/ in site-packages;
# mos._C also searches the nvidia package's directories and the system when it opens the library.
CUDA_RUNPATH = ["$ORIGIN/../nvidia/cu13/lib", "$ORIGIN/../nvidia/cublas/lib",
                "$ORIGIN/../nvidia/cuda_runtime/lib"]

SWITCHES = ("MOS_CUDA", "MOS_SANITIZE", "MOS_DEBUG", "MOS_WERROR", "MOS_CUDA_ARCHS", "CUDA_HOME")


def build_switches():
    """The switches a build was made with; a change of any of them rebuilds everything."""
    nvcc, _ = cuda_setting()
    return {**{name: os.environ.get(name, "") for name in SWITCHES}, "nvcc": nvcc or ""}


def without_build_machine_rpaths(args):
    """The linker arguments less the -rpath entries Python's own LDSHARED carries (its build
    machine's lib directory), so the RUNPATH holds only what the extension names."""
    kept, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("-rpath", "-Wl,-rpath"):
            skip_next = True
        elif not arg.startswith(("-Wl,-rpath,", "-Wl,-rpath=", "-Wl,-R")):
            kept.append(arg)
    return kept


class BuildExt(build_ext):
    """Builds the CUDA back end (cuda/*.cu with csrc/errors.c and workspace.c) as its own library,
    mos/_mos_cuda.so, linked against the CUDA runtime and cuBLAS; mos._C links neither and opens
    the library with dlopen when the first CUDA tensor arrives (csrc/cuda_loader.c)."""

    def run(self):
        # setuptools rebuilds only when a source is newer than the library; a changed switch
        # (MOS_CUDA=0 -> 1, MOS_DEBUG, ...) must rebuild too, so the last build's switches are kept.
        switches = build_switches()
        record = Path(self.build_temp) / "mos_build_switches.json"
        previous = json.loads(record.read_text()) if record.exists() else None
        if previous != switches:
            self.force = True
        super().run()
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(switches, indent=1))
        self.report_cpu_only(switches)

    def build_extensions(self):
        self.compiler.linker_so = without_build_machine_rpaths(self.compiler.linker_so)
        super().build_extensions()

    def report_cpu_only(self, switches):
        """A CPU-only build where nvcc was there says so; pip shows build output only with -v,
        so it also goes into mos/_build.json, which `import mos` reads."""
        built_cuda = any(("MOS_WITH_CUDA", "1") == tuple(m) for ext in self.extensions
                         for m in ext.define_macros) or any(
            Path(self.get_ext_fullpath("mos._C")).parent.glob("*cuda*.so"))
        info = {"cuda_mode": switches["MOS_CUDA"] or "auto", "nvcc": switches["nvcc"],
                "cuda_built": built_cuda, "debug": switches["MOS_DEBUG"] == "1",
                "sanitize": switches["MOS_SANITIZE"] == "1"}
        if switches["nvcc"] and not built_cuda:
            print(f"mos: nvcc found ({switches['nvcc']}) but the CUDA back end was not built: CPU-only",
                  file=sys.stderr)
        path = Path(self.get_ext_fullpath("mos._C")).parent / "_build.json"
        path.write_text(json.dumps(info, indent=1) + "\n")

    def build_extension(self, ext):
        nvcc, cuda_home = cuda_setting()
        cu_files = sorted((HERE / "cuda").glob("*.cu"))
        cublas = find_cublas(cuda_home) if nvcc else None
        if nvcc and not cublas:
            if flag("MOS_CUDA", "auto") == "1":
                sys.exit("MOS_CUDA=1 but cuBLAS was not found (toolkit or `pip install nvidia-cublas`)")
            print("mos: nvcc found but no cuBLAS; building CPU-only")
            nvcc = None
        library = Path(self.get_ext_fullpath(ext.name)).parent / CUDA_LIBRARY
        library.unlink(missing_ok=True)  # a CPU-only build must not leave an old back end behind
        if nvcc and cu_files:
            self.build_cuda_library(nvcc, cuda_home, cublas, cu_files, library)
        super().build_extension(ext)

    def build_cuda_library(self, nvcc, cuda_home, cublas, cu_files, library):
        cublas_inc, cublas_lib, cublas_name = cublas
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects, archs = [], cuda_archs()
        werror = ["-Werror", "all-warnings"] if flag("MOS_WERROR") == "1" else []  # our CI only
        for cu in cu_files:
            obj = out_dir / (cu.stem + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra",
                   *werror, f"-I{HERE / 'csrc'}", f"-I{cublas_inc}",
                   *archs, "-c", str(cu), "-o", str(obj)]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        # The core's error messages and workspace carving, compiled into the library as well
        # (uninstrumented even in MOS_SANITIZE builds: the library links no sanitizer runtime).
        flags = [f for f in c_flags() if not f.startswith("-fsanitize")] + ["-fvisibility=hidden"]
        objects += self.compiler.compile(["csrc/errors.c", "csrc/workspace.c"], output_dir=str(out_dir),
                                         include_dirs=["csrc"], extra_postargs=flags)
        lib_dirs = [str(d) for d in (cuda_home / "lib64", cuda_home / "lib") if d.exists()]
        self.compiler.link_shared_object(
            objects, str(library), libraries=["cudart", cublas_name, "stdc++"],
            library_dirs=lib_dirs + [str(cublas_lib)], runtime_library_dirs=CUDA_RUNPATH,
            extra_postargs=["-Wl,--no-undefined"])

    def copy_extensions_to_source(self):
        """--inplace and editable installs: the CUDA library travels with mos._C."""
        super().copy_extensions_to_source()
        for ext in self.extensions:
            built = Path(self.build_lib, self.get_ext_filename(ext.name)).parent / CUDA_LIBRARY
            inplace = HERE / Path(*ext.name.split(".")[:-1]) / CUDA_LIBRARY
            if built.exists():
                shutil.copyfile(built, inplace)
            else:
                inplace.unlink(missing_ok=True)


def extension():
    lib_dir = scipy_openblas32.get_lib_dir()
    link_args = []
    if flag("MOS_SANITIZE") == "1":
        link_args += ["-fsanitize=address,undefined"]
    return Extension(
        "mos._C",
        sources=sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c")),
        # A changed header or .inc rebuilds, as a changed .c does.
        depends=sorted(str(p.relative_to(HERE)) for pattern in ("*.h", "*.inc")
                       for p in (HERE / "csrc").glob(pattern)),
        include_dirs=["csrc", numpy.get_include(), scipy_openblas32.get_include_dir()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        library_dirs=[lib_dir],
        # dl: cpu_team.c finds the host's OpenMP runtime with dlsym (in libc itself from glibc 2.34).
        libraries=[scipy_openblas32.get_library()] + (["dl"] if sys.platform.startswith("linux") else []),
        # Installed next to scipy_openblas32 in site-packages (no build-machine path: a wheel
        # runs anywhere); mos/__init__ also preloads it, which an in-place build relies on.
        runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"],
        extra_compile_args=c_flags(),
        extra_link_args=link_args,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExt})
