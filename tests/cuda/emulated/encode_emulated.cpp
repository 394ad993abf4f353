// The GPU encoder kernels compiled as C++ for the CPU emulator.
#include "encode.cu"
