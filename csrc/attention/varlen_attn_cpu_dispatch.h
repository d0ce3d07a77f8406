// Which build of the CPU attention kernels (varlen_attn_cpu_kernels.h) the ops run. The extension itself
// holds a build for its own target (portable by default: x86-64-v2); setup.py also builds the kernels alone
// for x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512) as the modules uniref._C_x86_64_v3 / _v4, and
// uniref/ops/attention.py hands the widest one this CPU runs to uniref._C at import. Each lives in its own
// shared library, so no inline function compiled for a wide target can stand in for the portable one.
// Torch-free.
#pragma once

#include "attention/varlen_attn_params.h"

namespace uniref {

struct CpuAttnKernels {
  const char* target;  // "portable", "x86-64-v3", ... (the UNIREF_CPU_ARCH of that build)
  void (*forward)(const VarlenAttnParams& p, double softmax_scale);
  void (*backward)(const VarlenAttnBwdParams& p, double softmax_scale);
};

// The PyCapsule name of a CpuAttnKernels*; a change of the struct changes the name.
inline constexpr const char* kCpuAttnKernelsCapsule = "uniref.CpuAttnKernels.v1";

// The kernels the ops run now, and the switch (the table must outlive the process: a module's static).
const CpuAttnKernels& cpu_attn_kernels();
void use_cpu_attn_kernels(const CpuAttnKernels* kernels);

}  // namespace uniref
