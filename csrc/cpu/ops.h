// The CPU kernels' entry points, one per fedcomp op (schemas: fedcomp/_schemas.py), defined in
// the file of their family and registered for the CPU dispatch key in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fedcomp::cpu {

using at::Tensor;

// topk.cpp
std::tuple<Tensor, Tensor> topk_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t k,
                                       at::ScalarType index_dtype);
std::tuple<Tensor, Tensor> topk_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t k,
                                            at::ScalarType index_dtype, at::OptionalIntArrayRef rows);
std::tuple<Tensor, Tensor, Tensor> topk_threshold_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                         int64_t k, int64_t capacity, int64_t sample_size,
                                                         int64_t seed);

// sign.cpp
std::tuple<Tensor, Tensor> sign_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t block,
                                       bool l2);
std::tuple<Tensor, Tensor> sign_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t block,
                                            bool l2, at::OptionalIntArrayRef rows);
Tensor sign_decode_cpu(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block);
void sign_accumulate_cpu(const Tensor& out, const Tensor& packed, const Tensor& scales, int64_t block,
                         double alpha);
void sign_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList scales, int64_t block,
                              at::ArrayRef<double> alphas);
Tensor sign_majority_cpu(const Tensor& stack);

// qsgd.cpp
std::tuple<Tensor, Tensor> qsgd_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t levels,
                                    int64_t bucket, int64_t seed);
std::tuple<Tensor, Tensor> qsgd_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t levels,
                                         int64_t bucket, at::IntArrayRef seeds, at::OptionalIntArrayRef rows);
Tensor qsgd_decode_cpu(const Tensor& packed, const Tensor& norms, int64_t numel, int64_t levels, int64_t bucket);
void qsgd_accumulate_cpu(const Tensor& out, const Tensor& packed, const Tensor& norms, int64_t levels,
                         int64_t bucket, double alpha);
void qsgd_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList norms, int64_t levels,
                              int64_t bucket, at::ArrayRef<double> alphas);

// randk.cpp
Tensor randk_positions_cpu(const Tensor& round_keys, int64_t k, int64_t n);
std::tuple<Tensor, Tensor> randk_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                             at::IntArrayRef seeds, int64_t k, at::OptionalIntArrayRef rows);

// sparse.cpp
void sparse_accumulate_cpu(const Tensor& out, const Tensor& indices, const Tensor& values, double alpha);

}  // namespace fedcomp::cpu
