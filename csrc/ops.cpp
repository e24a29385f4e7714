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
  // relu(topk_k((x - b_dec) W_enc^T + b_enc)) over latent chunks of chunk_size (0: the kernel picks)
  // with a running per-row top-k; never forms [N, M]. Rows of values are sorted, largest first.
  m.def(
      "topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, int k, Tensor? dead_mask=None,"
      " int chunk_size=0) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_W_enc, grad_b_enc); grad_x is [0, d] unless need_grad_x. grad_b_dec,
  // -sum_n grad_x[n] = -(grad_b_enc @ W_enc), is left to autograd.
  m.def(
      "topk_encode_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor x, Tensor W_enc,"
      " Tensor? b_dec, bool need_grad_x=True) -> (Tensor, Tensor, Tensor)");
}
