// The Python module `dre_kernels._C`: empty; importing it loads this shared library, which runs the static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations of the other sources. Only setup.py compiles this file; the
// CMake build (for C++/libtorch users) makes the same library without Python, loaded by torch.ops.load_library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
