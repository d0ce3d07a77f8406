// `import uniref._C` loads this library; loading it runs every TORCH_LIBRARY registration in csrc/.
// The module itself only reports how it was built (see uniref/info.py).
#include <Python.h>

#ifndef UNIREF_CUDA_ARCHS
#define UNIREF_CUDA_ARCHS ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "uniref compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef UNIREF_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", UNIREF_CUDA_ARCHS);
  return m;
}
