// CPU features and the one ISA resolver of every entry point (ternary, int8, quantiser, peak probe):
// internal interface of isa.cpp. See bitnet_native.h for the ISA ids.
#pragma once
#include <string>

#include "int8.h"
#include "kernels.h"

namespace bitnet {

bool compiled(int isa);    // this build has a kernel for it
bool supported(int isa);   // compiled AND the running CPU/OS supports it
int best_isa();
int default_isa();         // the forced one (set_default_isa), else best_isa()
int set_default_isa(int isa);   // isa < 0: back to the best one; BITNET_EISA if unsupported
const std::string& cpu_brand();

// The kernels of one ISA: the ternary kernel table and the int8 GEMM.
struct IsaKernels {
  int isa;
  Kernel ternary;
  int8_gemm_fn int8;
};

// isa < 0: the default ISA. BITNET_OK, or BITNET_EISA when the ISA is not supported here.
int resolve_isa(int isa, IsaKernels* out);
int resolve_isa(int isa, Kernel* k);   // the ternary kernel only

}  // namespace bitnet
