// scores and attn_v on the fast read path, compiled as C++ for the CPU emulator.
#include "fast_primitives.cu"
