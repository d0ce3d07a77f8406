// `import uniref._C` loads this library; loading it runs every TORCH_LIBRARY registration in csrc/.
// The module itself reports how it was built (see uniref/info.py) and what the CUDA attention kernels
// support (read by uniref/attention.py's backend registry), so that Python keeps no copy of either.
#include <Python.h>

#include "attention/varlen_attn_cpu_dispatch.h"
#include "attention/varlen_attn_cuda_support.h"

#ifndef UNIREF_CUDA_ARCHS
#define UNIREF_CUDA_ARCHS ""
#endif
#ifndef UNIREF_CPU_ARCH
#define UNIREF_CPU_ARCH "unknown"
#endif

namespace {

// A tuple of the n items that make(i) builds (new references), or nullptr with the error set.
template <typename Make>
PyObject* tuple_of(std::size_t n, Make make) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n));
  if (t == nullptr) return nullptr;
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* item = make(i);
    if (item == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), item);  // steals the reference
  }
  return t;
}

// _use_cpu_attention_kernels(capsule | None): the build of the CPU attention kernels the ops run from now
// on (a `kernels` capsule of uniref._C_x86_64_v3 / _v4), or None for this extension's own.
PyObject* use_cpu_attention_kernels(PyObject*, PyObject* arg) {
  const uniref::CpuAttnKernels* kernels = nullptr;
  if (arg != Py_None) {
    kernels = static_cast<const uniref::CpuAttnKernels*>(PyCapsule_GetPointer(arg, uniref::kCpuAttnKernelsCapsule));
    if (kernels == nullptr) return nullptr;  // not such a capsule: TypeError / ValueError set
  }
  uniref::use_cpu_attn_kernels(kernels);
  Py_RETURN_NONE;
}

// cpu_attention_target() -> str: the target of the CPU attention kernels the ops run now.
PyObject* cpu_attention_target(PyObject*, PyObject*) {
  return PyUnicode_FromString(uniref::cpu_attn_kernels().target);
}

PyMethodDef methods[] = {
    {"_use_cpu_attention_kernels", use_cpu_attention_kernels, METH_O, "Switch the CPU attention kernels."},
    {"cpu_attention_target", cpu_attention_target, METH_NOARGS, "Target of the CPU attention kernels in use."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "uniref compiled ops", -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef UNIREF_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", UNIREF_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "cpu_arch", UNIREF_CPU_ARCH);
  // What the CUDA varlen attention kernels take (also in a build without them: it describes the source).
  PyObject* dims = tuple_of(uniref::kCudaAttnHeadDimCount,
                            [](std::size_t i) { return PyLong_FromLong(uniref::kCudaAttnHeadDims[i]); });
  PyObject* dtypes = tuple_of(uniref::kCudaAttnDtypeCount,
                              [](std::size_t i) { return PyUnicode_FromString(uniref::kCudaAttnDtypeNames[i]); });
  const bool ok = dims != nullptr && dtypes != nullptr &&
                  PyModule_AddObjectRef(m, "cuda_attention_head_dims", dims) == 0 &&
                  PyModule_AddObjectRef(m, "cuda_attention_dtypes", dtypes) == 0;
  Py_XDECREF(dims);  // (AddObjectRef took its own references)
  Py_XDECREF(dtypes);
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
