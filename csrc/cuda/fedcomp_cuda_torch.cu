// Thin torch binding of the framework-free CUDA kernels (fedcomp_cuda.cu). Compiled only
// when torch has CUDA (fedcomp/build.py: load_cuda_extension); it needs torch's c10/cuda
// headers. Defines fedcomp_cuda::<op> for fp32 contiguous CUDA tensors; fedcomp/_backend.py
// routes fedcomp::<op> on CUDA tensors here for fp32 and to the Triton kernels otherwise.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "fedcomp_cuda.cuh"

namespace {

using at::Tensor;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fedcomp CUDA ", what, ": ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> topk_ef_cuda(const Tensor& x, const c10::optional<Tensor>& residual, int64_t k) {
  const int64_t n = x.numel();
  auto values = at::empty({k}, x.options());
  auto indices = at::empty({k}, x.options().dtype(at::kLong));
  auto workspace = at::empty({static_cast<int64_t>(fedcomp::cuda::topk_ef_workspace_bytes(n))},
                             x.options().dtype(at::kByte));
  float* r = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  check(fedcomp::cuda::topk_ef(x.data_ptr<float>(), r, n, k, values.data_ptr<float>(), indices.data_ptr<int64_t>(),
                               workspace.data_ptr(), at::cuda::getCurrentCUDAStream()),
        "topk_ef");
  return {values, indices};
}

std::tuple<Tensor, Tensor> sign_ef_cuda(const Tensor& x, const c10::optional<Tensor>& residual, int64_t block,
                                        bool l2) {
  const int64_t n = x.numel();
  auto packed = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  auto scales = at::empty({(n + block - 1) / block}, x.options());
  float* r = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  check(fedcomp::cuda::sign_ef(x.data_ptr<float>(), r, n, block, l2, packed.data_ptr<uint8_t>(),
                               scales.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "sign_ef");
  return {packed, scales};
}

Tensor sign_decode_cuda(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block) {
  auto out = at::empty({numel}, scales.options());
  check(fedcomp::cuda::sign_decode(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), numel, block,
                                   out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "sign_decode");
  return out;
}

void sign_accumulate_cuda(const Tensor& out, const Tensor& packed, const Tensor& scales, int64_t block,
                          double alpha) {
  check(fedcomp::cuda::sign_accumulate(out.data_ptr<float>(), out.numel(), packed.data_ptr<uint8_t>(),
                                       scales.data_ptr<float>(), block, static_cast<float>(alpha),
                                       at::cuda::getCurrentCUDAStream()),
        "sign_accumulate");
}

void sparse_accumulate_cuda(const Tensor& out, const Tensor& indices, const Tensor& values, double alpha) {
  check(fedcomp::cuda::sparse_accumulate(out.data_ptr<float>(), indices.data_ptr<int64_t>(), values.data_ptr<float>(),
                                         indices.numel(), static_cast<float>(alpha),
                                         at::cuda::getCurrentCUDAStream()),
        "sparse_accumulate");
}

}  // namespace

TORCH_LIBRARY(fedcomp_cuda, m) {
  m.def("topk_ef(Tensor x, Tensor(a!)? residual, int k) -> (Tensor, Tensor)");
  m.def("sign_ef(Tensor x, Tensor(a!)? residual, int block, bool l2) -> (Tensor, Tensor)");
  m.def("sign_decode(Tensor packed, Tensor scales, int numel, int block) -> Tensor");
  m.def("sparse_accumulate(Tensor(a!) out, Tensor indices, Tensor values, float alpha) -> ()");
  m.def("sign_accumulate(Tensor(a!) out, Tensor packed, Tensor scales, int block, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(fedcomp_cuda, CUDA, m) {
  m.impl("topk_ef", &topk_ef_cuda);
  m.impl("sign_ef", &sign_ef_cuda);
  m.impl("sign_decode", &sign_decode_cuda);
  m.impl("sparse_accumulate", &sparse_accumulate_cuda);
  m.impl("sign_accumulate", &sign_accumulate_cuda);
}
