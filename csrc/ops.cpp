// fastdino._C: every C++ op schema in one place, plus the build description read by fastdino.info().
#include <Python.h>
#include <torch/library.h>

#ifdef FASTDINO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define FASTDINO_STR_(x) #x
#define FASTDINO_STR(x) FASTDINO_STR_(x)

#ifdef FASTDINO_WITH_CUDA
#define FASTDINO_BUILD_INFO                                                         \
  "{\"cpu\": true, \"cuda\": true, \"cuda_runtime\": " FASTDINO_STR(CUDART_VERSION) \
  ", \"cuda_archs\": \"" FASTDINO_STR(FASTDINO_CUDA_ARCHS) "\"}"
#else
#define FASTDINO_BUILD_INFO "{\"cpu\": true, \"cuda\": false, \"cuda_runtime\": null, \"cuda_archs\": \"\"}"
#endif

extern "C" {
// Importing fastdino._C runs the static op registrations below; the module itself only carries BUILD_INFO.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "BUILD_INFO", FASTDINO_BUILD_INFO) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fastdino, m) {
  // Fake (meta) implementations are registered in Python, in fastdino/ops/<op>.py.
  m.def("add_layer_norm(Tensor x, Tensor branch, Tensor? gamma, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor, Tensor)");
  m.def("dwconv_layer_norm(Tensor x, Tensor weight, Tensor? bias, Tensor norm_weight, Tensor norm_bias, float eps) "
        "-> Tensor");
  m.def("fused_linear(Tensor x, Tensor weight, Tensor? bias, str? act, Tensor? weight2, Tensor? bias2, "
        "Tensor? residual, Tensor? gamma) -> Tensor");
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor? mask_logits, float scale) -> Tensor");
  m.def("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, Tensor? reference_points=None) -> Tensor");
  m.def("rope_attention(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, Tensor? mask_logits, float scale) "
        "-> Tensor");
}
