// The fast read path compiled as C++ for the CPU emulator.
#include "decode_attention.cu"
