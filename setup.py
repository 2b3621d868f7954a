"""Package layout: iicl_fast/ with its Triton kernels in iicl_fast/kernels/ (not a top-level
`kernels/` folder: transformers >= 5.2x imports the PyPI package `kernels`, and a folder of that
name in the working directory shadowed it: `python -m iicl_fast` from a clone failed with an
ImportError), and the C++ extension iicl_fast._C built from csrc/
through torch.utils.cpp_extension. Metadata lives in pyproject.toml.

The extension needs torch at build time: install with `pip install --no-build-isolation`
(pip's isolated build env has no torch, and a bare torch requirement there would pull a
multi-GB CUDA build). Without torch importable the package installs without _C and
iicl_fast.LoraBank says how to build it."""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    print("iicl_fast: torch is not importable at build time: building without the C++ extension "
          "(use pip install --no-build-isolation)", file=sys.stderr)
else:
    if torch.version.cuda and CUDA_HOME and os.environ.get("IICL_NO_CUDA") != "1":
        # the CUDA masked AdamW too; sm_90 (Hopper) plus PTX for newer parts
        arch = os.environ.get("IICL_CUDA_ARCH", "-gencode=arch=compute_90,code=sm_90 "
                                                "-gencode=arch=compute_90,code=compute_90").split()
        ext_modules = [CUDAExtension("iicl_fast._C", ["csrc/lora_bank.cpp", "csrc/lora_bank_cuda.cu"],
                                     define_macros=[("IICL_WITH_CUDA", None)],
                                     extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                                         "nvcc": ["-O3", "-std=c++17", *arch]})]
    else:
        ext_modules = [CppExtension("iicl_fast._C", ["csrc/lora_bank.cpp"],
                                    extra_compile_args=["-O3", "-std=c++17"])]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=os.environ.get("IICL_USE_NINJA", "1") == "1")}

setup(
    packages=["iicl_fast", "iicl_fast.kernels"],
    package_data={"iicl_fast": ["data/*.txt", "data/*.json"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
