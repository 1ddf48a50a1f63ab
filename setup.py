"""Builds the extension fastattn._C.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu and the torch glue
csrc/cuda/*.cpp) are added when torch has CUDA and nvcc is found, or when FASTATTN_FORCE_CUDA=1.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch.utils.cpp_extension.
Set FASTATTN_SKIP_EXT=1 to install the pure-python package only (the torch backend then serves everything).
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTATTN_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("FASTATTN_PORTABLE") != "1":
        cxx.append("-march=native")
    nvcc_found = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    with_cuda = os.environ.get("FASTATTN_FORCE_CUDA") == "1" or (torch.version.cuda is not None and nvcc_found)
    kw = dict(name="fastattn._C", sources=sources, extra_link_args=["-fopenmp"])
    if with_cuda:
        kw["sources"] += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        kw["define_macros"] = [("FASTATTN_WITH_CUDA", None)]
        kw["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo",
                                                         "--expt-relaxed-constexpr"]}
        ext = CUDAExtension(**kw)
    else:
        kw["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(**kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
