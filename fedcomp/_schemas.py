"""The schemas of the fedcomp ops (namespace ``fedcomp``): the lowest layer, imported by the
op definitions (:mod:`fedcomp._library`) and by the backends that register kernels for them."""

SCHEMAS = {
    "topk_ef": "topk_ef(Tensor x, Tensor(a!)? residual, int k, ScalarType index_dtype) -> (Tensor, Tensor)",
    "topk_threshold_ef": (
        "topk_threshold_ef(Tensor x, Tensor(a!)? residual, int k, int capacity, int sample_size, "
        "int seed) -> (Tensor, Tensor, Tensor)"
    ),
    "sign_ef": "sign_ef(Tensor x, Tensor(a!)? residual, int block, bool l2) -> (Tensor, Tensor)",
    "topk_ef_rows": (
        "topk_ef_rows(Tensor x, Tensor(a!)? residual, int k, ScalarType index_dtype, int[]? rows=None) "
        "-> (Tensor, Tensor)"
    ),
    "sign_ef_rows": (
        "sign_ef_rows(Tensor x, Tensor(a!)? residual, int block, bool l2, int[]? rows=None) -> (Tensor, Tensor)"
    ),
    "randk_ef_rows": (
        "randk_ef_rows(Tensor x, Tensor(a!)? residual, int[] seeds, int k, int[]? rows=None) -> (Tensor, Tensor)"
    ),
    "sign_decode": "sign_decode(Tensor packed, Tensor scales, int numel, int block) -> Tensor",
    "sign_majority": "sign_majority(Tensor packed_stack) -> Tensor",
    "qsgd": "qsgd(Tensor x, Tensor(a!)? residual, int levels, int bucket, int seed) -> (Tensor, Tensor)",
    "qsgd_rows": (
        "qsgd_rows(Tensor x, Tensor(a!)? residual, int levels, int bucket, int[] seeds, int[]? rows=None) "
        "-> (Tensor, Tensor)"
    ),
    "qsgd_decode": "qsgd_decode(Tensor packed, Tensor norms, int numel, int levels, int bucket) -> Tensor",
    "sparse_accumulate": "sparse_accumulate(Tensor(a!) out, Tensor indices, Tensor values, float alpha) -> ()",
    "sign_accumulate": "sign_accumulate(Tensor(a!) out, Tensor packed, Tensor scales, int block, float alpha) -> ()",
    "qsgd_accumulate": (
        "qsgd_accumulate(Tensor(a!) out, Tensor packed, Tensor norms, int levels, int bucket, float alpha) -> ()"
    ),
    # many payloads of one kind and block size into one accumulator (fedcomp.aggregate)
    "sign_accumulate_many": (
        "sign_accumulate_many(Tensor(a!) out, Tensor[] packed, Tensor[] scales, int block, float[] alphas) -> ()"
    ),
    "qsgd_accumulate_many": (
        "qsgd_accumulate_many(Tensor(a!) out, Tensor[] packed, Tensor[] norms, int levels, int bucket, "
        "float[] alphas) -> ()"
    ),
}

# Host-side helpers: computed on the CPU whatever the payload's device (no Triton/CUDA kernel).
HOST_SCHEMAS = {
    "randk_positions": "randk_positions(Tensor round_keys, int k, int n) -> Tensor",
}
