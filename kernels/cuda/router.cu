// Router top-k, one thread per token. Ties go to the lower expert id (the CPU engine's rule).
// ids / weights: [tokens, k], in descending score order.

// Softmax over all experts, top-k of the probabilities, optional renormalisation (Mixtral,
// Qwen3 with norm_topk_prob; Qwen2-MoE and OLMoE without).
extern "C" __global__ void topk_softmax_f32(const float* logits, int tokens, int experts, int k, int renormalize,
                                            int* ids, float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (long long)t * experts;
    float m = -INFINITY;
    for (int e = 0; e < experts; ++e) m = fmaxf(m, l[e]);
    float denom = 0.0f;
    for (int e = 0; e < experts; ++e) denom += expf(l[e] - m);
    float chosen_sum = 0.0f;
    float prev = INFINITY;
    int prev_id = -1;
    for (int j = 0; j < k; ++j) {
        // The next entry in (score desc, id asc) order after (prev, prev_id).
        int best = -1;
        float bv = -INFINITY;
        for (int e = 0; e < experts; ++e) {
            float v = l[e];
            bool after = (v < prev) || (v == prev && e > prev_id);
            if (after && (best < 0 || v > bv)) {
                best = e;
                bv = v;
            }
        }
        ids[t * k + j] = best;
        float p = expf(bv - m) / denom;
        weights[t * k + j] = p;
        chosen_sum += p;
        prev = bv;
        prev_id = best;
    }
    if (renormalize) {
        for (int j = 0; j < k; ++j) weights[t * k + j] /= chosen_sum;
    }
}

// DeepSeek-V3: s = sigmoid(logit); choice = s + bias; each group scored by the sum of its two
// best choices; the best `topk_group` groups kept (others zeroed); top-k of the masked choice;
// weights are the unbiased s of the chosen experts, optionally renormalised, times `scaling`.
// At most 64 groups.
extern "C" __global__ void topk_sigmoid_group_f32(const float* logits, const float* bias, int tokens, int experts,
                                                  int k, int n_group, int topk_group, int renormalize,
                                                  float scaling, int* ids, float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (long long)t * experts;
    int per = experts / n_group;
    float gscore[64];
    for (int g = 0; g < n_group; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
        int i1 = -1;
        for (int e = g * per; e < (g + 1) * per; ++e) {
            float c = 1.0f / (1.0f + expf(-l[e])) + (bias ? bias[e] : 0.0f);
            if (i1 < 0 || c > b1) {
                b2 = b1;
                b1 = c;
                i1 = e;
            } else if (c > b2) {
                b2 = c;
            }
        }
        gscore[g] = per >= 2 ? b1 + b2 : b1;
    }
    // keep mask: the topk_group best groups (ties to the lower group).
    unsigned long long keep = 0ull;
    for (int j = 0; j < topk_group; ++j) {
        int best = -1;
        for (int g = 0; g < n_group; ++g) {
            if (keep & (1ull << g)) continue;
            if (best < 0 || gscore[g] > gscore[best]) best = g;
        }
        keep |= 1ull << best;
    }
    float prev = INFINITY;
    int prev_id = -1;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = -INFINITY;
        for (int e = 0; e < experts; ++e) {
            float c = (keep & (1ull << (e / per))) ? 1.0f / (1.0f + expf(-l[e])) + (bias ? bias[e] : 0.0f) : 0.0f;
            bool after = (c < prev) || (c == prev && e > prev_id);
            if (after && (best < 0 || c > bv)) {
                best = e;
                bv = c;
            }
        }
        ids[t * k + j] = best;
        float s = 1.0f / (1.0f + expf(-l[best]));
        weights[t * k + j] = s;
        sum += s;
        prev = bv;
        prev_id = best;
    }
    for (int j = 0; j < k; ++j) {
        float w = weights[t * k + j];
        if (renormalize) w /= (sum + 1e-20f);
        weights[t * k + j] = w * scaling;
    }
}
