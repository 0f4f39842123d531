// The mega_kernels op schemas (one set for every device; the CPU and CUDA implementations register per
// device in csrc/ema/ema_cpu.cpp and csrc/ema/ema_cuda_ops.cpp). They must equal EMA_FWD_SCHEMA,
// EMA_BWD_SCHEMA and EMA_STEP_SCHEMA in mega_kernels/ops/ema.py (tests/test_extension.py checks this).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mega_kernels, m) {
  m.def("ema_fwd(Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, Tensor? mask, Tensor? state, "
        "bool bidirectional, int truncation, bool return_state) -> (Tensor, Tensor)");
  m.def("ema_bwd(Tensor grad_y, Tensor? grad_state, Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, "
        "Tensor? mask, Tensor? state, bool bidirectional, int truncation) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ema_step(Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, Tensor state, Tensor? mask) "
        "-> (Tensor, Tensor)");
}

// Lets the ahead-of-time build (`import mega_kernels._C`) load this library like a Python module; the ops
// register from static initialisers either way.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
