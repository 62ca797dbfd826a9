// Services of api.cpp (thread pool, ISA dispatch) for the other drivers (int8.cpp, attention.cpp).
#pragma once
#include <cstdint>
#include <functional>

#include "kernels.h"

namespace bitnet {

int native_resolve(int isa, Kernel* k, int* resolved);   // BITNET_OK or BITNET_EISA
int native_threads();
void native_parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn);

}  // namespace bitnet
