// Expert activations: the SwiGLU epilogue of an expert's first GEMM, in f32 and bf16.

// y = silu(gate) * up, element-wise over n values.
extern "C" __global__ void silu_mul_f32(const float* gate, const float* up, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        y[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// GPT-OSS: g = min(gate, limit), u = clamp(up, -limit, limit), y = (u + 1) * g * sigmoid(alpha g).
extern "C" __global__ void clamped_swiglu_f32(const float* gate, const float* up, float* y, long long n,
                                              float limit, float alpha) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = fminf(gate[i], limit);
        float u = fminf(fmaxf(up[i], -limit), limit);
        y[i] = (u + 1.0f) * (g / (1.0f + expf(-(g * alpha))));
    }
}

// Fused epilogue of the gate/up GEMM: `gate_up` is [rows, 2 * inter] with the gate projection in
// columns [0, inter) and the up projection in [inter, 2 * inter) of each row; writes
// out[rows, inter] = silu(gate) * up in bf16, computed in f32. Eight values per thread per step
// (16-byte loads) when inter is a multiple of 8.
extern "C" __global__ void swiglu_bf16(const bf16_t* gate_up, bf16_t* out, int rows, int inter) {
    int row = blockIdx.y;
    if (row >= rows) return;
    const bf16_t* g = gate_up + (long long)row * 2 * inter;
    const bf16_t* u = g + inter;
    bf16_t* o = out + (long long)row * inter;
    if ((inter & 7) == 0) {
        int vecs = inter >> 3;
        for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < vecs; v += gridDim.x * blockDim.x) {
            uint4 gv = reinterpret_cast<const uint4*>(g)[v];
            uint4 uv = reinterpret_cast<const uint4*>(u)[v];
            const bf16_t* gs = reinterpret_cast<const bf16_t*>(&gv);
            const bf16_t* us = reinterpret_cast<const bf16_t*>(&uv);
            uint4 ov;
            bf16_t* os = reinterpret_cast<bf16_t*>(&ov);
#pragma unroll
            for (int j = 0; j < 8; ++j) os[j] = f32_to_bf16(silu(bf16_to_f32(gs[j])) * bf16_to_f32(us[j]));
            reinterpret_cast<uint4*>(o)[v] = ov;
        }
    } else {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x) {
            o[i] = f32_to_bf16(silu(bf16_to_f32(g[i])) * bf16_to_f32(u[i]));
        }
    }
}

extern "C" __global__ void f32_to_bf16_kernel(const float* x, bf16_t* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = f32_to_bf16(x[i]);
    }
}

extern "C" __global__ void bf16_to_f32_kernel(const bf16_t* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = bf16_to_f32(x[i]);
    }
}

// y[r, :] += bias[:] for a [rows, cols] f32 matrix.
extern "C" __global__ void add_bias_f32(float* y, const float* bias, int rows, int cols) {
    long long n = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] += bias[i % cols];
    }
}
