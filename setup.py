"""Build fastpeft; compile the optional CUDA extension in csrc/ only where it can be built.

The extension needs both nvcc and a CUDA build of torch. Anywhere else (a CPU wheel of torch, no
toolkit) the package installs as pure Python + Triton and says so, instead of failing: the CUDA
extension is an accelerator for some ops, never a requirement.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _cuda_extension():
    if os.environ.get("FASTPEFT_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:  # no hand-written CUDA kernel has beaten the Triton ones yet: csrc/ holds none
        print("fastpeft: no CUDA sources in csrc/; pure Python + Triton", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        print("fastpeft: building without the CUDA extension (needs nvcc and a CUDA build of torch)", file=sys.stderr)
        return [], {}
    ext = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
