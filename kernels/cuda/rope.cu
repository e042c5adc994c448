// Rotary position embedding, in place, rotate-half convention over the first `rot_dim` values of
// each head (`interleave` first de-interleaves pairs, as DeepSeek's MLA rope does). `inv_freq`
// has rot_dim / 2 entries; cos and sin are multiplied by `scaling` (YaRN's attention factor).
// x: [tokens, heads, head_dim]; positions: [tokens]. One block per (token, head), with at least
// rot_dim / 2 threads (the launcher guarantees it), so every pair is read before any is written.
extern "C" __global__ void rope_f32(float* x, const int* positions, const float* inv_freq, int heads,
                                    int head_dim, int rot_dim, int interleave, float scaling) {
    int tok = blockIdx.x, h = blockIdx.y;
    float* v = x + ((long long)tok * heads + h) * head_dim;
    int half = rot_dim / 2;
    float p = (float)positions[tok];
    {
        int i = threadIdx.x;
        float a = 0.0f, b = 0.0f, c = 0.0f, s = 0.0f;
        if (i < half) {
            if (interleave) {
                a = v[2 * i];
                b = v[2 * i + 1];
            } else {
                a = v[i];
                b = v[i + half];
            }
            float ang = p * inv_freq[i];
            c = cosf(ang) * scaling;
            s = sinf(ang) * scaling;
        }
        __syncthreads();
        if (i < half) {
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}
