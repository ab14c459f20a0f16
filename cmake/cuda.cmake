# The CUDA backend (src/cuda). MLA_WITH_CUDA tells the core to register it.
#
# The kernels are built as an object library of their own so that the C++-only warning flags of `mla` never
# reach nvcc, then folded into `mla`. Machine code for sm_80 (the portable mma.sync path, any GPU since Ampere)
# and sm_90a (Hopper; the same kernels, plus wgmma where it exists). Each architecture is named with -gencode,
# because `-arch=sm_90a` also runs a plain sm_90 pass.
find_package(CUDAToolkit REQUIRED)

# CMake 3.25 does not know that nvcc 12+ takes -std=c++20; tell it.
if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
endif()
set_target_properties(mla PROPERTIES CUDA_ARCHITECTURES OFF)

set(MLA_CUDA_GENCODE "80;90a" CACHE STRING "CUDA architectures to build machine code for (e.g. 80;90a)")
option(MLA_CUDA_VERBOSE_PTXAS "Print ptxas register/spill reports for every CUDA kernel" OFF)

file(GLOB_RECURSE _mla_cuda_sources CONFIGURE_DEPENDS
  ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cu ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cpp)

add_library(mla_cuda OBJECT ${_mla_cuda_sources})
set_target_properties(mla_cuda PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON
                                          POSITION_INDEPENDENT_CODE ON)
target_include_directories(mla_cuda PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/src)
target_link_libraries(mla_cuda PRIVATE CUDA::cudart CUDA::cublasLt)
target_compile_definitions(mla_cuda PRIVATE MLA_WITH_CUDA)
set(_mla_cuda_flags -lineinfo --expt-relaxed-constexpr)
foreach(_arch IN LISTS MLA_CUDA_GENCODE)
  list(APPEND _mla_cuda_flags "-gencode=arch=compute_${_arch},code=sm_${_arch}")
endforeach()
if("90a" IN_LIST MLA_CUDA_GENCODE)
  target_compile_definitions(mla_cuda PRIVATE MLA_CUDA_HAS_SM90A)  # the wgmma decode kernel exists
endif()
if(MLA_CUDA_VERBOSE_PTXAS)
  list(APPEND _mla_cuda_flags "--ptxas-options=-v,--warn-on-spills,--warn-on-local-memory-usage")
endif()
# Never --use_fast_math: the rope kernel needs accurate sinf/cosf at positions ~1.5e5.
target_compile_options(mla_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${_mla_cuda_flags}>
                                        $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)

# NCCL (mla::Communicator, src/cuda/nccl.cpp): from the CUDA toolkit, the system, MLA_NCCL_ROOT, or the wheel
# that PyTorch installs (site-packages/nvidia/nccl, whose library has only the versioned name). A CUDA build
# without NCCL is refused here rather than built without multi-GPU support.
set(MLA_NCCL_ROOT "$ENV{NCCL_HOME}" CACHE PATH "Where NCCL is installed (include/nccl.h, lib/libnccl.so)")
set(_mla_nccl_hints ${MLA_NCCL_ROOT} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_TARGET_DIR})
find_package(Python3 QUIET COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  execute_process(COMMAND ${Python3_EXECUTABLE} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
                  OUTPUT_VARIABLE _mla_nccl_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_mla_nccl_wheel)
    list(APPEND _mla_nccl_hints ${_mla_nccl_wheel})
  endif()
endif()
find_path(MLA_NCCL_INCLUDE_DIR nccl.h HINTS ${_mla_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
find_library(MLA_NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_mla_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
             PATH_SUFFIXES lib lib64)
if(NOT MLA_NCCL_INCLUDE_DIR OR NOT MLA_NCCL_LIBRARY)
  message(FATAL_ERROR "MLA_WITH_CUDA=ON needs NCCL (nccl.h and libnccl) for mla::Communicator; found header: "
                      "'${MLA_NCCL_INCLUDE_DIR}', library: '${MLA_NCCL_LIBRARY}'. Install NCCL (libnccl-dev, or "
                      "pip's nvidia-nccl-cu12), set -DMLA_NCCL_ROOT=<prefix>, or configure with -DMLA_WITH_CUDA=OFF.")
endif()
message(STATUS "NCCL: ${MLA_NCCL_LIBRARY} (header in ${MLA_NCCL_INCLUDE_DIR})")
target_include_directories(mla_cuda PRIVATE ${MLA_NCCL_INCLUDE_DIR})

target_sources(mla PRIVATE $<TARGET_OBJECTS:mla_cuda>)
target_compile_definitions(mla PRIVATE MLA_WITH_CUDA)
# Plain library paths, not imported targets: the exported `mla` must not need find_package(CUDAToolkit).
target_link_libraries(mla PRIVATE ${CUDA_cudart_LIBRARY} ${CUDA_cublasLt_LIBRARY} ${MLA_NCCL_LIBRARY})

# `mla bench --device cuda` (tools/bench.cpp) calls mla::tools::bench_cuda, defined in tools/bench_cuda.cu;
# bench/cuda/main.cpp is a stand-alone entry point for the GPU machine (scripts/gpu.sh).
if(MLA_BUILD_TOOLS AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/tools/bench_cuda.cu)
  add_library(mla_bench_cuda OBJECT ${CMAKE_CURRENT_SOURCE_DIR}/tools/bench_cuda.cu)
  set_target_properties(mla_bench_cuda PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD 20)
  target_include_directories(mla_bench_cuda PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include
                                                    ${CMAKE_CURRENT_SOURCE_DIR}/src ${CMAKE_CURRENT_SOURCE_DIR}/tools)
  target_link_libraries(mla_bench_cuda PRIVATE CUDA::cudart nlohmann_json::nlohmann_json)
  target_compile_options(mla_bench_cuda PRIVATE ${_mla_cuda_flags})
  add_executable(mla_bench_cuda_main ${CMAKE_CURRENT_SOURCE_DIR}/bench/cuda/main.cpp $<TARGET_OBJECTS:mla_bench_cuda>)
  set_target_properties(mla_bench_cuda_main PROPERTIES OUTPUT_NAME mla-bench-cuda)
  target_link_libraries(mla_bench_cuda_main PRIVATE mla CUDA::cudart nlohmann_json::nlohmann_json)
endif()

# The multi-GPU benchmark (NCCL; scripts/gpu.sh nccl): plain C++ over the public API and the CUDA runtime, as its own
# program and behind `mla bench --device cuda --tp N`.
if(MLA_BUILD_TOOLS)
  add_library(mla_bench_parallel_obj OBJECT ${CMAKE_CURRENT_SOURCE_DIR}/bench/cuda/parallel.cpp)
  target_include_directories(mla_bench_parallel_obj PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include)
  target_link_libraries(mla_bench_parallel_obj PRIVATE CUDA::cudart nlohmann_json::nlohmann_json)
  add_executable(mla_bench_parallel ${CMAKE_CURRENT_SOURCE_DIR}/bench/cuda/parallel_main.cpp
                                    $<TARGET_OBJECTS:mla_bench_parallel_obj>)
  set_target_properties(mla_bench_parallel PROPERTIES OUTPUT_NAME mla-bench-parallel)
  target_link_libraries(mla_bench_parallel PRIVATE mla CUDA::cudart nlohmann_json::nlohmann_json Threads::Threads)
endif()

# mla_cli is defined after this file is included: attach the benchmark objects once the directory is done.
function(_mla_cuda_attach_cli)
  if(TARGET mla_cli AND TARGET mla_bench_cuda)
    target_sources(mla_cli PRIVATE $<TARGET_OBJECTS:mla_bench_cuda>)
    if(TARGET mla_bench_parallel_obj)
      target_sources(mla_cli PRIVATE $<TARGET_OBJECTS:mla_bench_parallel_obj>)
      target_compile_definitions(mla_cli PRIVATE MLA_CLI_HAS_PARALLEL_BENCH)
    endif()
    target_link_libraries(mla_cli PRIVATE CUDA::cudart)
    target_compile_definitions(mla_cli PRIVATE MLA_CLI_HAS_CUDA_BENCH)
  endif()
endfunction()
cmake_language(DEFER CALL _mla_cuda_attach_cli)
