"""Build of sdmprune and its extension sdmprune._C.

Environment switches (all optional):
  SDMPRUNE_CUDA=auto|1|0   build the CUDA part of the extension: auto (default) when torch is a CUDA
                           build and nvcc is found; 1 forces it (error if impossible); 0 disables it.
  SDMPRUNE_SKIP_EXT=1      build no extension at all (the package falls back to torch ops).
  TORCH_CUDA_ARCH_LIST     as usual for torch extensions (default: the visible GPU, else 9.0).
  MAX_JOBS                 parallel compile jobs for ninja.
"""
import glob
import os

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("SDMPRUNE_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("SDMPRUNE_CUDA", "auto").lower()
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "force"):
        if not have_cuda:
            raise RuntimeError(
                "SDMPRUNE_CUDA=1 but torch is not a CUDA build or nvcc was not found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        with_cuda = True
    elif flag in ("0", "false", "no", "off"):
        with_cuda = False
    else:
        with_cuda = have_cuda

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # no -std flag: BuildExtension adds the standard this torch's headers are written for (C++20
    # from torch 2.10); forcing C++17 compiled them against a different language than libtorch
    cxx_flags = ["-O3"]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        ext = CUDAExtension(
            "sdmprune._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "sdmprune._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sdmprune", "sdmprune.*"]) + ["sdmprune.kernels"],
    package_dir={"sdmprune": "sdmprune", "sdmprune.kernels": "sdmprune_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
