"""Builds dnateq._C: the CPU operators always, the CUDA kernels when the
installed torch has CUDA and nvcc is found.

Environment:
  DNATEQ_CUDA=1      require the CUDA build (fail if it is not possible)
  DNATEQ_CUDA=0      CPU only
  TORCH_CUDA_ARCH_LIST  CUDA archs (default here "8.0;9.0" to bound build time)
  MAX_JOBS           parallel compile jobs (torch's ninja build)
Build with `pip install --no-build-isolation -e .` so the extension compiles
against the installed torch.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension,
                                       CppExtension, CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    flag = os.environ.get("DNATEQ_CUDA", "auto").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                "DNATEQ_CUDA=1 but the CUDA build is not possible: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} (install a CUDA torch "
                "and put nvcc on PATH)")
        return True
    return possible


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    # csrc/*.cpp (schemas) and csrc/<family>/*.cpp (the operator families);
    # the CUDA sources are csrc/<family>/*.cu (docs/ARCHITECTURE.md).
    cpp = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden",
                 "-DPy_LIMITED_API=0x030B0000"]
    link = ["-fopenmp"]
    if not cuda_wanted():
        return CppExtension("dnateq._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link,
                            py_limited_api=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    return CUDAExtension(
        "dnateq._C", cpp + cu,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("DNATEQ_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-DDNATEQ_WITH_CUDA=1"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                     "-DDNATEQ_WITH_CUDA=1"]},
        extra_link_args=link, py_limited_api=True)


setup(
    name="dnateq",
    version="0.1.0",
    description="DNA-TEQ: adaptive exponential quantization of DNNs with "
                "exponential-domain dot products (PyTorch C++/CUDA extension)",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"dnateq": ["py.typed", "hw/paper_networks.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm"],
    extras_require={
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        "eval": ["torchvision", "sacrebleu", "scikit-learn"],
        "plots": ["matplotlib"],
    },
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
