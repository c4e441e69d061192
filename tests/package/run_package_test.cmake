# ctest driver: install the built project into a scratch prefix, then build
# tests/package/consumer.c against it twice -- with find_package(commvq)
# (shared and static targets) and with pkg-config -- and run each program.
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
set(prefix ${WORK}/prefix)
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run(${CMAKE_COMMAND} --install ${BIN} --prefix ${prefix})
# The consumer uses the compiler the library was built with: the static
# library carries that compiler's OpenMP runtime (libgomp or libomp).
run(${CMAKE_COMMAND} -S ${SRC}/tests/package -B ${WORK}/cmake-build -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_BUILD_RPATH=${prefix}/lib -DCMAKE_C_COMPILER=${CC})
run(${CMAKE_COMMAND} --build ${WORK}/cmake-build)
set(ENV{LD_LIBRARY_PATH} "${prefix}/lib:${prefix}/lib64")
run(${WORK}/cmake-build/consumer_shared)
run(${WORK}/cmake-build/consumer_static)
# pkg-config
find_program(PKGCONF pkg-config REQUIRED)
file(GLOB pcdir ${prefix}/lib*/pkgconfig)
set(ENV{PKG_CONFIG_PATH} "${pcdir}")
execute_process(COMMAND ${PKGCONF} --cflags --libs commvq OUTPUT_VARIABLE flags
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config cannot find commvq in ${pcdir}")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
run(${CC} -std=c11 ${SRC}/tests/package/consumer.c ${flags} -o ${WORK}/consumer_pc)
run(${WORK}/consumer_pc)
