# The CUDA backend. Sources are added here as they exist; MLA_WITH_CUDA tells the core to register it.
find_package(CUDAToolkit REQUIRED)
file(GLOB _mla_cuda_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cu ${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/*.cpp)
if(_mla_cuda_sources)
  target_sources(mla PRIVATE ${_mla_cuda_sources})
  target_compile_definitions(mla PRIVATE MLA_WITH_CUDA)
  target_link_libraries(mla PRIVATE CUDA::cudart CUDA::cublasLt)
endif()
