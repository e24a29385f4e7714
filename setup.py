"""Builds megasae._C: the CPU kernels always, the CUDA kernels whenever nvcc is found.

MEGASAE_CUDA=0 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST picks the GPU architectures
(default below); MAX_JOBS caps the parallel ninja build.
"""

import glob
import os

from setuptools import setup

# torch infers the toolkit from `which nvcc`, which a wrapper script (e.g. /usr/local/bin/nvcc)
# misleads; the toolkit's standard home holds the right headers and libcudart.
toolkit_set = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
if not toolkit_set and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402 (after CUDA_HOME is set)


def extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp: at::parallel_for is a header template, so OpenMP must be on in our own objects.
    cxx = ["-O3", "-fopenmp"]
    kwargs = {"extra_link_args": ["-fopenmp"], "py_limited_api": True}
    if os.environ.get("MEGASAE_CUDA", "1") == "0" or CUDA_HOME is None:
        print("megasae: building the CPU kernels only")
        return CppExtension("megasae._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    # Without a GPU to probe, torch would compile for every architecture it knows; keep it short.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    print(
        f"megasae: building the CPU and CUDA kernels with {CUDA_HOME}/bin/nvcc "
        f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    flags = {"cxx": [*cxx, "-DMEGASAE_WITH_CUDA"], "nvcc": ["-O3", "-DMEGASAE_WITH_CUDA"]}
    return CUDAExtension("megasae._C", sources, extra_compile_args=flags, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # The library uses no CPython API beyond module creation, so one wheel serves every Python >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
