// The CPU attention kernels alone, as a Python module of their own (uniref._C_x86_64_v3 / _v4): setup.py
// compiles this file once per wide target, and uniref/ops/attention.py passes the module's `kernels`
// capsule to uniref._C when the CPU runs that target (varlen_attn_cpu_dispatch.h).
#include <Python.h>

#include "attention/varlen_attn_cpu_dispatch.h"
#include "attention/varlen_attn_cpu_kernels.h"

#ifndef UNIREF_CPU_ARCH
#error "built by setup.py, which names the target (-DUNIREF_CPU_ARCH=...)"
#endif

#define UNIREF_CONCAT_(a, b) a##b
#define UNIREF_CONCAT(a, b) UNIREF_CONCAT_(a, b)
#define UNIREF_STR_(a) #a
#define UNIREF_STR(a) UNIREF_STR_(a)

namespace {
const uniref::CpuAttnKernels kKernels{UNIREF_CPU_ARCH, &uniref::varlen_attn_forward, &uniref::varlen_attn_backward};
}  // namespace

// TORCH_EXTENSION_NAME: the module's name (e.g. _C_x86_64_v4), which torch's build passes to every source.
PyMODINIT_FUNC UNIREF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "uniref." UNIREF_STR(TORCH_EXTENSION_NAME),
                                      "uniref's CPU attention kernels for " UNIREF_CPU_ARCH, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<uniref::CpuAttnKernels*>(&kKernels),
                                    uniref::kCpuAttnKernelsCapsule, nullptr);
  const bool ok = capsule != nullptr && PyModule_AddObjectRef(m, "kernels", capsule) == 0 &&
                  PyModule_AddStringConstant(m, "target", UNIREF_CPU_ARCH) == 0;
  Py_XDECREF(capsule);
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
