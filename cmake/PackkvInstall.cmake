# Install rules and the exported packkv::packkv target for find_package(packkv). Only the public
# headers are installed: include/packkv (API, format spec, codec) and cuda/device_codec.hpp.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS packkv EXPORT packkvTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/packkv DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.hpp")
install(EXPORT packkvTargets NAMESPACE packkv:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/packkv)

set(PACKKV_CONFIG_WITH_CUDA ${PACKKV_WITH_CUDA})
configure_package_config_file(cmake/packkvConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/packkvConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/packkv)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/packkvConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/packkvConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/packkvConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/packkv)
