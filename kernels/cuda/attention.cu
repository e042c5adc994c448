// Causal attention of t new queries of one sequence over its cached keys and values (decode
// and prefill chunks), with grouped-query heads, an optional sliding window and optional
// per-head sink logits (GPT-OSS). One block per (query, head); scores live in dynamic shared
// memory (P floats), so P is bounded by the shared memory the launcher requests.
//
// q: [t, heads, qk_dim] at positions q_start..q_start+t; k: [P, kv_heads, qk_dim];
// v: [P, kv_heads, v_dim]; out: [t, heads * v_dim]. window = 0 means none; sinks may be null.
extern "C" __global__ void attention_f32(const float* q, const float* k, const float* v, float* out, int heads,
                                         int kv_heads, int qk_dim, int v_dim, int q_start, float scale,
                                         int window, const float* sinks) {
    extern __shared__ float scores[];
    __shared__ float scratch[32];
    int i = blockIdx.x, h = blockIdx.y;
    int group = heads / kv_heads;
    int kvh = h / group;
    int pos = q_start + i;
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    int n = pos + 1 - lo;
    const float* qv = q + ((long long)i * heads + h) * qk_dim;

    float m = -INFINITY;
    for (int jj = threadIdx.x; jj < n; jj += blockDim.x) {
        const float* kv = k + ((long long)(lo + jj) * kv_heads + kvh) * qk_dim;
        float s = 0.0f;
        for (int d = 0; d < qk_dim; ++d) s += qv[d] * kv[d];
        s *= scale;
        scores[jj] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, scratch);
    float sink = sinks ? sinks[h] : -INFINITY;
    m = fmaxf(m, sink);
    float local = 0.0f;
    for (int jj = threadIdx.x; jj < n; jj += blockDim.x) {
        float e = expf(scores[jj] - m);
        scores[jj] = e;
        local += e;
    }
    float denom = block_sum(local, scratch);
    if (sinks) denom += expf(sink - m);
    __syncthreads();
    float* o = out + (long long)i * heads * v_dim + (long long)h * v_dim;
    for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int jj = 0; jj < n; ++jj) acc += scores[jj] * v[((long long)(lo + jj) * kv_heads + kvh) * v_dim + d];
        o[d] = acc / denom;
    }
}
