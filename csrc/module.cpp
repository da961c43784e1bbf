// vicl_fast._C: the Python module object and the schemas of every op.
//
// Ops are registered with the dispatcher (TORCH_LIBRARY) so that
// torch.ops.vicl_fast.<op> picks the CPU or CUDA kernel from the input's
// device; implementations live beside their algorithm (csrc/lsa/, ...).
// Fake (meta) implementations for torch.compile are registered in Python
// (vicl_fast/ops/*.py, torch.library.register_fake).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing vicl_fast._C runs the static initialisers below, which register
// the ops; the module itself carries no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vicl_fast, m) {
  // Batched exact linear sum assignment (see docs/design.md, "Solver").
  //   cost: (B, N, M) float16/bfloat16/float32/float64, any strides.
  //   row_ind, col_ind: (B, min(N, M)) int64, SciPy's semantics, -1 where the
  //   matrix failed; status: (B,) int32, 0 ok, 1 invalid entry (NaN or the
  //   infinity of the wrong sign), 2 infeasible.
  m.def("linear_sum_assignment(Tensor cost, bool maximize) -> (Tensor row_ind, Tensor col_ind, Tensor status)");

  // RandP dense kernels (csrc/randp/retrieve_cuda.cu; CUDA only: on CPU the
  // Python wrappers in vicl_fast/ops/randp_kernels.py run the references).
  //   cosine_cost: a (B, P, D), b (B, Q, D) float16/bfloat16/float32/float64
  //   -> (B, P, Q) float32 = -(normalize(a, eps) @ normalize(b, eps)^T).
  m.def("cosine_cost(Tensor a, Tensor b, float eps) -> Tensor");
  //   gather_rows_add: src (B, P, D), index (B, Q) int64, add (B, Q, D) of
  //   src's dtype or None -> (B, Q, D): out[b, q] = src[b, index[b, q]] + add[b, q].
  //   An out-of-range index gives a NaN row (no out-of-bounds read).
  m.def("gather_rows_add(Tensor src, Tensor index, Tensor? add) -> Tensor");
  //   scatter_rows_add (the adjoint): grad (B, Q, D), index (B, Q) int64 ->
  //   (B, P, D): out[b, p] = sum over q with index[b, q] == p, in increasing q
  //   (deterministic, no atomics); out-of-range indices are ignored.
  m.def("scatter_rows_add(Tensor grad, Tensor index, int P) -> Tensor");
}
