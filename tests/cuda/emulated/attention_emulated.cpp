// The attention kernels compiled as C++ for the CPU emulator.
#include "attention.cu"
