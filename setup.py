"""Build chain: setup.py -> CMake (CMakeLists.txt) -> the pybind11 module ``fastdecode._C``.

Environment:
  FASTDECODE_CUDA        "1" requires CUDA, "0" disables it; unset builds CUDA when nvcc is found.
  FASTDECODE_CUDA_ARCHS  CUDA architectures, ";"-separated (default "80;90").
  FASTDECODE_BUILD_TYPE  CMake build type (default "Release").

torch is not needed to build: the extension takes raw pointers, sizes, strides and the CUDA
stream from Python, so one build serves every torch >= 2.4.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """The nvcc to build with: $CUDACXX, then $CUDA_HOME/bin, then PATH, then /usr/local/cuda."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def tool(module: str, attr: str, exe: str) -> str:
    """A build tool from its PyPI package (build isolation) or else from PATH."""
    try:
        mod = __import__(module)
        return str(Path(getattr(mod, attr)) / exe)
    except (ImportError, AttributeError):
        return exe


def triton_importable() -> bool:
    """Whether the environment being installed into has triton. Under pip's build isolation
    this process sees only the build requirements (pip's PYTHONPATH hides the target's
    site-packages), so a fresh interpreter without that PYTHONPATH is asked as well."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        return True
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)"
    return subprocess.run([sys.executable, "-c", probe], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        want = os.environ.get("FASTDECODE_CUDA", "").strip()
        if want not in ("", "0", "1"):
            raise SystemExit(f"FASTDECODE_CUDA must be 0 or 1, found {want!r}")
        nvcc = None if want == "0" else find_nvcc()
        if want == "1" and nvcc is None:
            raise SystemExit("FASTDECODE_CUDA=1 but no nvcc was found (set CUDA_HOME or CUDACXX)")
        if want == "" and nvcc is None:
            print("fastdecode: nvcc not found, building the CPU-only extension", flush=True)
        if not triton_importable():
            print("fastdecode: triton not found; the Triton backends will read 'no' in "
                  "`fastdecode info`; pip install triton to enable them", flush=True)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("FASTDECODE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTDECODE_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja', 'BIN_DIR', 'ninja')}",
        ]
        if nvcc:
            archs = os.environ.get("FASTDECODE_CUDA_ARCHS", "80;90")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        cmake = tool("cmake", "CMAKE_BIN_DIR", "cmake")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = ["-j", str(self.parallel)] if self.parallel else []
        subprocess.run([cmake, "--build", str(build_dir), "--config", cfg, *jobs], check=True)


setup(
    packages=find_packages(include=["fastdecode", "fastdecode.*"])
    + ["fastdecode.triton_kernels"]
    + [f"fastdecode.triton_kernels.{p}" for p in find_packages("triton_kernels")],
    package_dir={"fastdecode.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("fastdecode._C")],
    cmdclass={"build_ext": CMakeBuild},
)
