"""Builds internimage._C: the DCNv3 operator's C++ CPU kernels, plus CUDA kernels when asked.

CUDA sources are built when torch is a CUDA build, a CUDA toolkit is found and either a GPU is
present or FORCE_CUDA=1. Install with ``pip install --no-build-isolation -e .`` after torch.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "internimage's build needs torch installed first: "
        "pip install torch==2.14.1 torchvision==0.29.1 && pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """CUDA_HOME from the environment, else the toolkit root that nvcc itself reports.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper script,
    and then linking fails with "cannot find -lcudart".
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "empty.cu")
        open(source, "w").close()
        result = subprocess.run(
            [nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "empty.o")],
            capture_output=True,
            text=True,
        )
    match = re.search(r"^#\$ TOP=(.*)$", result.stdout + result.stderr, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())  # TOP is <toolkit>/bin/..
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def want_cuda(cuda_home: str | None) -> bool:
    if torch.version.cuda is None or cuda_home is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


cuda_home = find_cuda_home()
with_cuda = want_cuda(cuda_home)
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home
# Imported only now: the module reads CUDA_HOME when it is first imported.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("DEBUG", "0") == "1"
cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
# -fno-trapping-math: nothing reads floating-point exception flags, and without it GCC will not
# turn a conditionally computed value into a blend where the target has no masked instructions
# (AVX2), so the CPU kernels' branch-free sample loops would not vectorise there. Results are
# unchanged (NaN and infinity propagate as before).
# -Wno-psabi: GCC notes that passing 32/64-byte vectors by value changes the ABI where AVX is
# not enabled; the CPU kernels only pass them between always-inlined functions of one build.
cxx_flags += ["-fopenmp", "-std=c++20", "-fno-trapping-math", "-Wno-psabi"]
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# csrc/cuda/dcn_kernel.cu compiled again by the host compiler, under the CPU emulation of the
# CUDA execution model (tests run the CUDA kernels through it on machines without a GPU).
sources += sorted(glob.glob(os.path.join("csrc", "emulation", "*.cpp")))
extra_compile_args = {"cxx": cxx_flags}
define_macros = []
extension_cls = CppExtension
if with_cuda:
    extension_cls = CUDAExtension
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra_compile_args["nvcc"] = ["-O3"] if not debug else ["-O0", "-g"]
    define_macros.append(("WITH_CUDA", None))

print(f"internimage: building the DCNv3 extension with CUDA={'yes' if with_cuda else 'no'}")

setup(
    packages=find_packages(include=["internimage", "internimage.*"]),
    ext_modules=[
        extension_cls(
            name="internimage._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
