// csrc/cuda/dcn_kernel.cu itself, compiled by the host compiler under the CUDA emulation as for
// sm_80 (__CUDA_ARCH__ 800: the grad_input scatter uses float atomics).
#define INTERNIMAGE_EMULATE_CUDA 800
#include "dcn_entries.h"
#include "../cuda/dcn_kernel.cu"

INTERNIMAGE_DEFINE_DCN_ENTRIES(dcn_entries_sm80)
