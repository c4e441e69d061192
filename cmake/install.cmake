# Installation: shared and static libraries, the header, the tool (see
# tools/), a CMake package (find_package(commvq) -> commvq::commvq and
# commvq::commvq_static) and a pkg-config file.
include(CMakePackageConfigHelpers)

install(TARGETS commvq commvq_static EXPORT commvqTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/commvq.h ${PROJECT_SOURCE_DIR}/include/commvq_train.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# The CUDA interop header needs no CUDA header; it is installed always (its
# functions return CVQ_ERR_BACKEND_UNAVAILABLE in builds without CUDA).
install(FILES ${PROJECT_SOURCE_DIR}/include/commvq_cuda.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# The engine-interop header (includes <vulkan/vulkan.h>), only with the Vulkan backend.
if(COMMVQ_VULKAN_STATUS MATCHES "^yes")
  install(FILES ${PROJECT_SOURCE_DIR}/include/commvq_vulkan.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
endif()

set(COMMVQ_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/commvq)
install(EXPORT commvqTargets NAMESPACE commvq:: DESTINATION ${COMMVQ_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/commvqConfig.cmake.in
  ${PROJECT_BINARY_DIR}/commvqConfig.cmake INSTALL_DESTINATION ${COMMVQ_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/commvqConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/commvqConfig.cmake ${PROJECT_BINARY_DIR}/commvqConfigVersion.cmake
        DESTINATION ${COMMVQ_CMAKE_DIR})

# pkg-config: the static library's private dependencies go in Libs.private.
set(COMMVQ_PC_LIBS_PRIVATE "-lm -lpthread -ldl") # -ldl: the Vulkan loader is dlopened
if(OpenMP_C_FOUND)
  string(APPEND COMMVQ_PC_LIBS_PRIVATE " ${OpenMP_C_FLAGS}")
endif()
if(COMMVQ_CUDA_ENABLED)
  # the CUDA runtime is linked statically (loads without a driver)
  string(APPEND COMMVQ_PC_LIBS_PRIVATE " ${COMMVQ_CUDART_STATIC} -lrt -lstdc++")
endif()
# Relocatable: the prefix is found from the .pc file's own folder, so an
# install with `cmake --install --prefix X` works wherever X is.
set(COMMVQ_PC_PREFIX "\${pcfiledir}")
string(REPLACE "/" ";" _libdir_parts "${CMAKE_INSTALL_LIBDIR}/pkgconfig")
foreach(_part ${_libdir_parts})
  string(APPEND COMMVQ_PC_PREFIX "/..")
endforeach()
configure_file(${PROJECT_SOURCE_DIR}/cmake/commvq.pc.in ${PROJECT_BINARY_DIR}/commvq.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/commvq.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
