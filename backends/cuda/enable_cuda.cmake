# Included by the top CMakeLists.txt (file scope of the top directory, where
# enable_language(CUDA) must run because the library targets there take the
# kernels' objects). Decides whether the CUDA backend is built:
# COMMVQ_CUDA_ENABLED, and the reason in COMMVQ_CUDA_WHY when it is not.
set(COMMVQ_CUDA_ENABLED OFF)
set(COMMVQ_CUDA_WHY "off")
if(NOT COMMVQ_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # sm_75..sm_90 machine code plus compute_90 PTX, unless the user chose.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(CMAKE_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90" CACHE STRING
          "CUDA architectures (commvq default: sm_75..sm_90 and compute_90 PTX)" FORCE)
    endif()
    enable_language(CUDA)
    # C++ for tests/cuda/emulate_kernels.cpp (the kernels run on CPU threads)
    enable_language(CXX)
    set(COMMVQ_CUDA_ENABLED ON)
  elseif(COMMVQ_CUDA STREQUAL "ON")
    message(FATAL_ERROR "COMMVQ_CUDA=ON but no CUDA compiler (nvcc) was found")
  else()
    set(COMMVQ_CUDA_WHY "no CUDA toolkit")
  endif()
endif()
