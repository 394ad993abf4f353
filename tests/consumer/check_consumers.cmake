# Run by ctest: installs the built packkv into a scratch prefix, then builds and runs the consumer
# project with find_package and with add_subdirectory. Inputs: PACKKV_SOURCE_DIR, PACKKV_BINARY_DIR,
# WORK_DIR.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

set(consumer ${PACKKV_SOURCE_DIR}/tests/consumer)
file(REMOVE_RECURSE ${WORK_DIR})
run(${CMAKE_COMMAND} --install ${PACKKV_BINARY_DIR} --prefix ${WORK_DIR}/prefix)
# Only the public headers are installed: no device code, no internal interface.
file(GLOB_RECURSE installed RELATIVE ${WORK_DIR}/prefix/include ${WORK_DIR}/prefix/include/*)
foreach(header IN LISTS installed)
  if(NOT header MATCHES "^packkv/[a-z_/]+\\.hpp$" OR header MATCHES "backend|detail")
    message(FATAL_ERROR "installed a header that is not public: ${header}")
  endif()
endforeach()
foreach(expected packkv/cache.hpp packkv/format/block.hpp packkv/cuda/device_codec.hpp)
  list(FIND installed ${expected} at)
  if(at EQUAL -1)
    message(FATAL_ERROR "a public header was not installed: ${expected} (installed: ${installed})")
  endif()
endforeach()

run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/find -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/find -j2)
run(${WORK_DIR}/find/consumer)

run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/subdir -DPACKKV_SOURCE_DIR=${PACKKV_SOURCE_DIR})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/subdir -j2 --target consumer)
run(${WORK_DIR}/subdir/consumer)
