# Sourced by gpu-check.sh: makes the build and test dependencies available on a GPU machine that
# cannot install packages. Whatever the system lacks (Open MPI, Boost.Program_options, fmt,
# GoogleTest, OpenBLAS, NCCL headers) is taken from Debian packages carried in .gpu-deps/ (fetch them
# with `scripts/gpu-env.sh --fetch` on a machine with apt) and unpacked under /tmp/gpu-deps; NCCL comes
# from the CUDA toolkit or, failing that, from PyTorch's nvidia-nccl wheel. Exports CMAKE_ARGS.
if [ "${1:-}" = --fetch ]; then
  mkdir -p .gpu-deps && (cd .gpu-deps && apt-get download openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev \
    libpmix2 libhwloc15 libevent-core-2.1-7 libevent-pthreads-2.1-7 libfabric1 libucx0 libibverbs1 librdmacm1 \
    libpsm2-2 libpsm-infinipath1 libnl-3-200 libnl-route-3-200 libnuma1 libxnvctrl0 libltdl7 libmunge2 libfmt-dev \
    libfmt9 libboost-program-options-dev libboost-program-options1.74.0 libboost-program-options1.74-dev \
    libboost1.74-dev libgtest-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libopenblas0 libgfortran5)
  return 0 2>/dev/null || exit 0
fi

CMAKE_ARGS=()
have_system_deps() {
  command -v mpirun >/dev/null && [ -e /usr/include/boost/program_options.hpp ] && ldconfig -p | grep -q libopenblas &&
    { [ -e /usr/include/fmt/format.h ] || [ -e /usr/local/include/fmt/format.h ]; }
}
if [ -d .gpu-deps ]; then  # one known set, whatever the image has (images differ between machines)
  d=/tmp/gpu-deps
  mkdir -p $d
  for f in .gpu-deps/*.deb; do dpkg -x "$f" $d; done
  lib=$d/usr/lib/x86_64-linux-gnu
  # Debian links these through update-alternatives, which dpkg -x does not run.
  for t in mpirun mpiexec mpicc mpicxx orterun; do
    [ -e $d/usr/bin/$t.openmpi ] && ln -sf $t.openmpi $d/usr/bin/$t
  done
  ln -sf openblas-pthread/libopenblas.so.0 $lib/libopenblas.so.0
  ln -sf openblas-pthread/libopenblas.so $lib/libopenblas.so
  export PATH=$d/usr/bin:$PATH
  export LD_LIBRARY_PATH=$lib:$lib/openmpi/lib:$lib/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export OPAL_PREFIX=$d/usr PMIX_MCA_preg=native
  export CMAKE_PREFIX_PATH=$d/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  CMAKE_ARGS+=(-DBoost_DIR=$(echo $lib/cmake/Boost-*) -Dfmt_DIR=$lib/cmake/fmt -DGTest_DIR=$lib/cmake/GTest
               -DBLAS_LIBRARIES=$lib/openblas-pthread/libopenblas.so
               -DCBLAS_INCLUDE_DIR=$d/usr/include/x86_64-linux-gnu/openblas-pthread
               -DMPIEXEC_EXECUTABLE=$d/usr/bin/mpiexec -DMPI_CXX_COMPILER=$d/usr/bin/mpicxx.openmpi)
fi
if ! ldconfig -p | grep -q 'libnccl\.so' && [ ! -e /usr/local/cuda/lib64/libnccl.so.2 ]; then
  nccl_root=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null)
  if [ -n "$nccl_root" ]; then
    CMAKE_ARGS+=(-DNCCL_ROOT=$nccl_root)
    export LD_LIBRARY_PATH=$nccl_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
