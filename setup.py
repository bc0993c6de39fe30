"""Build: setuptools drives CMake (Ninja generator) to build focalnet_kernels._C from csrc/.

Environment variables:
  FOCALNET_CUDA_ARCHS   semicolon/comma separated SM list, default "80;90" (PTX of the last is embedded)
  FOCALNET_SKIP_CUDA=1  build the CPU backend only even if nvcc is found
  FOCALNET_SKIP_EXT=1   build no extension at all (pure-Python install; reference + Triton paths only)
  FOCALNET_BUILD_JOBS   parallel compile jobs (default: CPU count)
  FOCALNET_PTXAS_VERBOSE=1  print ptxas register/spill usage of the CUDA kernels
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    return nvcc


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("FOCALNET_SKIP_EXT") == "1":
            print("focalnet: FOCALNET_SKIP_EXT=1, not building focalnet_kernels._C", flush=True)
            return
        super().run()

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("FOCALNET_CUDA_ARCHS", "80;90").replace(",", ";").replace(" ", "")
        skip_cuda = os.environ.get("FOCALNET_SKIP_CUDA", "0") == "1"
        nvcc = None if skip_cuda else _find_nvcc()
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFOCALNET_VERSION={VERSION}",
            f"-DFOCALNET_CUDA_ARCHS={archs}",
            f"-DFOCALNET_SKIP_CUDA={'ON' if (skip_cuda or nvcc is None) else 'OFF'}",
            f"-DFOCALNET_PTXAS_VERBOSE={'ON' if os.environ.get('FOCALNET_PTXAS_VERBOSE') == '1' else 'OFF'}",
        ]
        if nvcc is not None:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        try:
            import ninja  # noqa: F401  (pip's ninja puts the binary on PATH via its module)
            args.append(f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja') or ninja.BIN_DIR + '/ninja'}")
        except Exception:
            pass
        jobs = os.environ.get("FOCALNET_BUILD_JOBS", str(os.cpu_count() or 2))
        if skip_cuda:
            print("focalnet: FOCALNET_SKIP_CUDA=1: building the CPU backend only", flush=True)
        elif nvcc is None:
            print("focalnet: nvcc not found: building the CPU backend only (no CUDA kernels)", flush=True)
        else:
            print(f"focalnet: building CPU and CUDA backends with {nvcc} for archs {archs}", flush=True)
        self._run(args)
        self._run(["cmake", "--build", str(build_dir), "--parallel", jobs])

    @staticmethod
    def _run(cmd):
        # Stream the compiler's own output so a failure shows the real error, not a truncated wall.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode != 0:
            lines = proc.stdout.splitlines()
            first = next((i for i, ln in enumerate(lines) if "error" in ln.lower()), max(0, len(lines) - 40))
            summary = "\n".join(lines[first:first + 40])
            raise RuntimeError(
                f"focalnet: build step failed ({' '.join(cmd[:3])} ...), first errors:\n{summary}"
            )


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("focalnet_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
