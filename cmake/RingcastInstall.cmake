# `cmake --install` for projects that embed ringcast: the `ringcast` executable, the libraries, the
# public headers (runtime, base, and the comm headers they include; kernels/ stays internal), the CMake
# package (find_package(ringcast) -> ringcast::ringcast, with ringcast::runtime/comm/kernels/base
# under it) and ringcast.pc. Both locate ringcast relative to their own installed file, so the prefix
# may move; its dependencies are found where this build found them. The libraries are static by
# default, so their private dependencies (OpenMP, BLAS, cuBLAS, cudart, NCCL) are part of the package's link.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# The one target consumers link; C++20 because the public headers use std::span.
add_library(ringcast_library INTERFACE)
add_library(ringcast::ringcast ALIAS ringcast_library)
target_link_libraries(ringcast_library INTERFACE ringcast_runtime)
target_compile_features(ringcast_library INTERFACE cxx_std_20)
set_target_properties(ringcast_library PROPERTIES EXPORT_NAME ringcast)
foreach(layer IN ITEMS base comm kernels runtime)
  set_target_properties(ringcast_${layer} PROPERTIES EXPORT_NAME ${layer})
endforeach()

# CUDA and NCCL live outside the system library path on some machines; keep the installed binary runnable.
set_target_properties(ringcast PROPERTIES INSTALL_RPATH_USE_LINK_PATH TRUE)
install(TARGETS ringcast)
install(TARGETS ringcast_library ringcast_runtime ringcast_kernels ringcast_comm ringcast_base
        EXPORT ringcastTargets)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/runtime/include/ ${PROJECT_SOURCE_DIR}/runtime/base/include/
                  ${PROJECT_SOURCE_DIR}/comm/include/
        TYPE INCLUDE)

set(RINGCAST_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/ringcast)
install(EXPORT ringcastTargets NAMESPACE ringcast:: DESTINATION ${RINGCAST_INSTALL_CMAKEDIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ringcastConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/ringcastConfig.cmake
                              INSTALL_DESTINATION ${RINGCAST_INSTALL_CMAKEDIR})
# 0.x: a minor release may change the API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/ringcastConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/ringcastConfig.cmake ${PROJECT_BINARY_DIR}/ringcastConfigVersion.cmake
        DESTINATION ${RINGCAST_INSTALL_CMAKEDIR})
if(RINGCAST_WITH_CUDA)
  install(FILES ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake DESTINATION ${RINGCAST_INSTALL_CMAKEDIR})
endif()

# ringcast.pc spells out what the imported targets above carry, from what the find modules found
# here: MPI's include directories and libraries (so a plain c++ works), OpenMP, BLAS, cuBLAS, cudart, NCCL;
# plus, as CMake does for imported libraries, a run path to those outside the linker's own directories
# (the CUDA toolkit's, MPI's), so that what a plain c++ links also starts.
set(ringcast_pc_cflags)
set(ringcast_pc_libs ${MPI_CXX_LINK_FLAGS} ${MPI_CXX_LIBRARIES} ${OpenMP_CXX_LIBRARIES} ${BLAS_LINKER_FLAGS}
                     ${BLAS_LIBRARIES})
foreach(dir IN LISTS MPI_CXX_INCLUDE_DIRS)
  list(APPEND ringcast_pc_cflags -I${dir})
endforeach()
foreach(def IN LISTS MPI_CXX_COMPILE_DEFINITIONS)
  list(APPEND ringcast_pc_cflags -D${def})
endforeach()
list(APPEND ringcast_pc_cflags ${MPI_CXX_COMPILE_OPTIONS})
if(RINGCAST_WITH_CUDA)
  list(APPEND ringcast_pc_cflags -DRINGCAST_WITH_CUDA=1)
  foreach(dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
    list(APPEND ringcast_pc_cflags -I${dir})
  endforeach()
  list(APPEND ringcast_pc_libs ${NCCL_LIBRARY} ${CUDA_cublas_LIBRARY} ${CUDA_cudart_LIBRARY})
endif()
set(ringcast_pc_rpath)
foreach(lib IN LISTS ringcast_pc_libs)
  get_filename_component(ringcast_pc_libdir ${lib} DIRECTORY)
  if(IS_ABSOLUTE ${lib} AND NOT ringcast_pc_libdir IN_LIST CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES)
    list(APPEND ringcast_pc_rpath -Wl,-rpath,${ringcast_pc_libdir})
  endif()
endforeach()
list(REMOVE_DUPLICATES ringcast_pc_rpath)
list(APPEND ringcast_pc_libs ${ringcast_pc_rpath})
list(JOIN ringcast_pc_cflags " " RINGCAST_PC_CFLAGS)
list(JOIN ringcast_pc_libs " " RINGCAST_PC_LIBS)
# prefix is found from the .pc's own folder, as the CMake package finds it from its own.
file(RELATIVE_PATH RINGCAST_PC_PREFIX /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
string(REGEX REPLACE "/$" "" RINGCAST_PC_PREFIX ${RINGCAST_PC_PREFIX})
configure_file(${PROJECT_SOURCE_DIR}/cmake/ringcast.pc.in ${PROJECT_BINARY_DIR}/ringcast.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/ringcast.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
