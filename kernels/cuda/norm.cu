// Normalisations over the last dimension, one block per row (blockDim a multiple of 32).

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * cols;
    float* yr = y + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, float* y, int cols,
                                          float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * cols;
    float* yr = y + (long long)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, scratch) / cols;
    float v = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    float inv = rsqrtf(block_sum(v, scratch) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// bf16 activations and weight, f32 statistics.
extern "C" __global__ void rms_norm_bf16(const bf16_t* x, const bf16_t* w, bf16_t* y, int cols, float eps) {
    __shared__ float scratch[32];
    const bf16_t* xr = x + (long long)blockIdx.x * cols;
    bf16_t* yr = y + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = bf16_to_f32(xr[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = f32_to_bf16(bf16_to_f32(w[i]) * (bf16_to_f32(xr[i]) * inv));
}
