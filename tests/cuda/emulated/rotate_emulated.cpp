// The rotation kernel compiled as C++ for the CPU emulator.
#include "rotate.cu"
