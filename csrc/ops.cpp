// The megasae operator schemas, one for every device; kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// `import megasae._C` loads this library, whose static initialisers register the ops with the
// dispatcher; the Python module itself only records whether CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&def);
#ifdef MEGASAE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(megasae, m) {
  // Fake impls and autograd are registered from Python; point the dispatcher there.
  m.set_python_module("megasae.ops._custom_ops");
  m.def("sparse_decode(Tensor indices, Tensor values, Tensor W_dec, Tensor? b_dec) -> Tensor");
  // Returns (grad_values, grad_W_dec); grad_b_dec is grad.sum(0), left to autograd.
  m.def(
      "sparse_decode_backward(Tensor grad, Tensor indices, Tensor values, Tensor W_dec)"
      " -> (Tensor, Tensor)");
}
