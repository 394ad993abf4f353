# Decides whether the CUDA backend is built and sets the toolchain up for it.
# Result: PACKKV_WITH_CUDA (ON/OFF).
set(PACKKV_WITH_CUDA OFF)
if(NOT PACKKV_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(PACKKV_WITH_CUDA ON)
  elseif(PACKKV_CUDA STREQUAL "ON")
    message(FATAL_ERROR "PACKKV_CUDA=ON but no CUDA compiler was found")
  endif()
endif()

if(PACKKV_WITH_CUDA)
  # CMake before 3.25.2 does not know nvcc's C++20 flag; tell it.
  if(CMAKE_VERSION VERSION_LESS 3.25.2)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  find_package(CUDAToolkit REQUIRED)
  # Device code compressed for size: every kernel is instantiated per head dim, parameter encoding
  # and storage type, and the default compression leaves the cubins about 8x larger (attention.cu:
  # 4.6 MB of object against 0.55 MB; the SASS is the same). The driver decompresses a module when
  # it loads it. An nvcc without the option builds without it.
  include(CheckCompilerFlag)
  check_compiler_flag(CUDA "--compress-mode=size" PACKKV_NVCC_COMPRESSES_FOR_SIZE)
  if(PACKKV_NVCC_COMPRESSES_FOR_SIZE)
    add_compile_options($<$<COMPILE_LANGUAGE:CUDA>:--compress-mode=size>)
  endif()
  message(STATUS "packkv: CUDA backend ON (architectures: ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "packkv: CUDA backend OFF")
endif()
