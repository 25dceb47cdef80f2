// csrc/cuda/dcn_kernel.cu itself, compiled by the host compiler under the CUDA emulation as for
// sm_90 (__CUDA_ARCH__ 900: the grad_input scatter uses float4 atomics where it can).
#define INTERNIMAGE_EMULATE_CUDA 900
#include "dcn_entries.h"
#include "../cuda/dcn_kernel.cu"

INTERNIMAGE_DEFINE_DCN_ENTRIES(dcn_entries_sm90)
