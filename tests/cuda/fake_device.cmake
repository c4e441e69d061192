# The emulated CUDA device (tests/cuda/fake_device.cpp): the library's own
# objects (core, CPU backend, the CUDA host glue, Vulkan when built) with the
# kernels run on CPU threads and a host implementation of the CUDA runtime
# instead of libcudart_static. Included by the top CMakeLists.txt (where the
# library targets and their link libraries are final) when the CUDA backend
# and the tests are built.
#
#   commvq_fakecuda      static library: the library on the emulated device
#   cuda_check_emulated  backends/cuda/tools/cuda_check.c (the GPU conformance
#                        program of scripts/gpu-check.sh) on the emulated
#                        device: ctest cuda_check_emulated
#   cuda_faults_emulated tests/cuda/fake_faults.c: the error paths, one fault
#                        injected at each place in turn
# (tests/CMakeLists.txt adds test_conformance_cuda_emulated and
# test_extremes_cuda_emulated: the cmocka suites, linked with this library.)
# The objects the library is made of: those commvq_static compiles, plus the
# object libraries it takes whole (the Vulkan backend's embedded SPIR-V), but
# not the CUDA kernels: fake_device.cpp compiles them for the emulator.
set(fake_objects $<TARGET_OBJECTS:commvq_static>)
foreach(src ${COMMVQ_SOURCES})
  if(src MATCHES "^\\$<TARGET_OBJECTS:" AND NOT src MATCHES "commvq_cuda_kernels")
    list(APPEND fake_objects ${src})
  endif()
endforeach()
add_library(commvq_fakecuda STATIC
  ${PROJECT_SOURCE_DIR}/tests/cuda/fake_device.cpp
  ${PROJECT_SOURCE_DIR}/tests/cuda/cuda_emu_runtime.cpp
  ${fake_objects})
set_target_properties(commvq_fakecuda PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)
target_include_directories(commvq_fakecuda
  PUBLIC ${PROJECT_SOURCE_DIR}/include ${CUDAToolkit_INCLUDE_DIRS}
  PRIVATE ${PROJECT_SOURCE_DIR}/tests/cuda ${PROJECT_SOURCE_DIR}/backends/cuda ${PROJECT_SOURCE_DIR}/core)
# the host arithmetic stands in for the device's: the reference's rules
target_compile_options(commvq_fakecuda PRIVATE -ffp-contract=off -fno-fast-math -Wall -Wextra
  -Wno-unknown-pragmas -Wno-unused-parameter -Wno-unused-function)
if(COMMVQ_WERROR)
  target_compile_options(commvq_fakecuda PRIVATE -Werror)
endif()
set(fake_libs ${COMMVQ_PRIVATE_LIBS})
list(REMOVE_ITEM fake_libs ${COMMVQ_CUDART_STATIC})
target_link_libraries(commvq_fakecuda PUBLIC ${fake_libs} Threads::Threads)
if(COMMVQ_LIBM)
  target_link_libraries(commvq_fakecuda PUBLIC ${COMMVQ_LIBM})
endif()

add_executable(cuda_check_emulated ${PROJECT_SOURCE_DIR}/backends/cuda/tools/cuda_check.c)
target_compile_options(cuda_check_emulated PRIVATE ${COMMVQ_C_FLAGS})
target_link_libraries(cuda_check_emulated PRIVATE commvq_fakecuda)
set_target_properties(cuda_check_emulated PROPERTIES LINKER_LANGUAGE CXX)
add_test(NAME cuda_check_emulated COMMAND cuda_check_emulated)
# 4-6 min of thread barriers on 2 cores: started early, beside the longest memcheck test
set_tests_properties(cuda_check_emulated PROPERTIES TIMEOUT 1200 COST 900)

add_executable(cuda_faults_emulated ${PROJECT_SOURCE_DIR}/tests/cuda/fake_faults.c)
target_compile_options(cuda_faults_emulated PRIVATE ${COMMVQ_C_FLAGS})
target_link_libraries(cuda_faults_emulated PRIVATE commvq_fakecuda)
set_target_properties(cuda_faults_emulated PROPERTIES LINKER_LANGUAGE CXX)
add_test(NAME cuda_faults_emulated COMMAND cuda_faults_emulated)
# device memory left allocated at exit fails both programs (fake_device.cpp)
set_tests_properties(cuda_check_emulated cuda_faults_emulated PROPERTIES ENVIRONMENT "COMMVQ_FAKE_CUDA_STRICT=1")
set_tests_properties(cuda_faults_emulated PROPERTIES TIMEOUT 1200)
