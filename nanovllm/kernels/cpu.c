/*
 * The CPU fast path's kernels, float32 (see cpu.py, which compiles this file once per machine
 * and calls it through ctypes). Each replaces a chain of small PyTorch ops of the decoder
 * layer, whose dispatch costs more than their arithmetic at decode sizes:
 *   rms_norm          y = w * v / sqrt(mean(v^2) + eps) of v = x, or of v = x + residual
 *                     (the sum also written out, as the residual of the next layer)
 *   qk_norm_rope      Qwen3's per-head RMSNorm of q and k, then the rotary embedding
 *   silu_and_mul      silu(gate) * up
 *   decode_attention  store each sequence's new K/V row, then attend over its paged cache
 * Rows are spread over OpenMP threads (torch's own OpenMP runtime, so no second thread pool)
 * when there are enough of them to pay for it.
 *
 * Decode attention: one task per (sequence, K/V head). A task first writes its sequence's new
 * K/V row into the cache slot, then walks the sequence's keys in order through its block
 * table, in tiles of TILE keys: each key row is read once from the cache for all `group` query
 * heads that share the K/V head (GQA), with no gathered copy. Softmax is the online form of
 * flash attention: a running maximum m, sum l and unnormalised accumulator acc per query head;
 * a tile of scores s updates m' = max(m, max s), alpha = e^(m - m'), p = e^(s - m'),
 * l' = alpha l + sum p, acc' = alpha acc + p V; the output is acc / l (zeros for no keys).
 *
 * Layouts (float32 or int64, the last dimension contiguous):
 *   q        [num_seqs, num_heads, head_dim], row stride q_stride, head stride head_dim
 *   k_new    [num_seqs, num_kv_heads, head_dim], row stride k_stride (v_new: v_stride)
 *   caches   [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   slots    [num_seqs] cache slot of each new row (-1: not stored)
 *   tables   [num_seqs, table_stride] block ids; lens [num_seqs] keys per sequence
 *   out      [num_seqs, num_heads, head_dim], contiguous
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 32

/* e^x within about 2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a polynomial
 * (Cephes' coefficients), 2^n through the exponent bits. Branch-free, so the compiler
 * vectorises the loops that call it. x is clamped to [-87, 88]: e^-87 (about 1.6e-38) weighs
 * nothing next to a softmax maximum's 1, and e^88 is near FLT_MAX. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rintf(x * 1.44269504088896341f); /* rintf vectorises, floorf does not */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void attend_one(const float *q, const float *k_cache, const float *v_cache,
                       const int64_t *table, int64_t len, float *out, int64_t kv_head,
                       int64_t num_kv_heads, int64_t group, int64_t head_dim,
                       int64_t block_size, float scale) {
    const int64_t D = head_dim, G = group;
    float qs[G * D], acc[G * D], m[G], l[G], p[G * TILE];
    const float *krow[TILE], *vrow[TILE];
    for (int64_t i = 0; i < G * D; i++) {
        qs[i] = q[i] * scale;
        acc[i] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    int64_t column = 0, offset = 0; /* block-table column and row within that block */
    for (int64_t t0 = 0; t0 < len; t0 += TILE) {
        const int64_t n = len - t0 < TILE ? len - t0 : TILE;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = (table[column] * block_size + offset) * num_kv_heads + kv_head;
            krow[j] = k_cache + row * D;
            vrow[j] = v_cache + row * D;
            if (++offset == block_size) {
                offset = 0;
                column++;
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < n; j++) p[g * TILE + j] = dot(qs + g * D, krow[j], D);
        for (int64_t g = 0; g < G; g++) {
            float *pg = p + g * TILE;
            float mx = m[g];
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < n; j++) mx = pg[j] > mx ? pg[j] : mx;
            const float alpha = m[g] == -INFINITY ? 0.0f : exp_approx(m[g] - mx);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < n; j++) {
                pg[j] = exp_approx(pg[j] - mx);
                sum += pg[j];
            }
            l[g] = l[g] * alpha + sum;
            m[g] = mx;
            if (alpha != 1.0f)
                for (int64_t d = 0; d < D; d++) acc[g * D + d] *= alpha;
        }
        for (int64_t j = 0; j < n; j++) {
            const float *v = vrow[j];
            for (int64_t g = 0; g < G; g++) {
                const float w = p[g * TILE + j];
                float *a = acc + g * D;
                for (int64_t d = 0; d < D; d++) a[d] += w * v[d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] * inv;
    }
}

void decode_attention(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                      const float *v_new, int64_t v_stride, const int64_t *slots, float *k_cache,
                      float *v_cache, const int64_t *tables, int64_t table_stride,
                      const int64_t *lens, float *out, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                      int num_threads) {
    const int64_t group = num_heads / num_kv_heads, D = head_dim;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t s = 0; s < num_seqs; s++) {
        for (int64_t h = 0; h < num_kv_heads; h++) {
            if (slots[s] >= 0) {
                const int64_t row = slots[s] * num_kv_heads + h;
                memcpy(k_cache + row * D, k_new + s * k_stride + h * D, D * sizeof(float));
                memcpy(v_cache + row * D, v_new + s * v_stride + h * D, D * sizeof(float));
            }
            attend_one(q + s * q_stride + h * group * D, k_cache, v_cache,
                       tables + s * table_stride, lens[s], out + (s * num_heads + h * group) * D,
                       h, num_kv_heads, group, D, block_size, scale);
        }
    }
}

/* Rows of n: out = w * v / sqrt(mean(v^2) + eps), where v = x, or with a residual
 * v = x + residual, which is also written to res_out. */
void rms_norm(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
              float *res_out, const float *w, float *out, int64_t rows, int64_t n, float eps,
              int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * x_stride;
        float *oi = out + i * n;
        const float *v = xi;
        if (residual) {
            const float *ri = residual + i * r_stride;
            float *si = res_out + i * n;
            for (int64_t j = 0; j < n; j++) si[j] = xi[j] + ri[j];
            v = si;
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < n; j++) ss += v[j] * v[j];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t j = 0; j < n; j++) oi[j] = v[j] * inv * w[j];
    }
}

/* qkv rows [tokens, (num_heads + 2 num_kv_heads) * head_dim]: every q and k head normalised
 * over head_dim (q_w or k_w), then rotated by its token's position: with y = (y1, y2) the two
 * halves, out = (y1 cos1 - y2 sin1, y2 cos2 + y1 sin2) from the [max_position, head_dim] tables.
 * Writes q [tokens, num_heads, head_dim] and k [tokens, num_kv_heads, head_dim]. */
void qk_norm_rope(const float *qkv, int64_t qkv_stride, const int64_t *positions,
                  const float *q_w, const float *k_w, const float *cos_table,
                  const float *sin_table, float *q, float *k, int64_t tokens, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim, float eps, int num_threads) {
    const int64_t D = head_dim, half = head_dim / 2, heads = num_heads + num_kv_heads;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (tokens * heads * D >= 65536)
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict c = cos_table + positions[t] * D;
        const float *restrict s = sin_table + positions[t] * D;
        for (int64_t h = 0; h < heads; h++) {
            const float *restrict x = qkv + t * qkv_stride + h * D;
            const float *restrict w = h < num_heads ? q_w : k_w;
            float *restrict o = h < num_heads ? q + (t * num_heads + h) * D
                                              : k + (t * num_kv_heads + h - num_heads) * D;
            float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
            for (int64_t j = 0; j < D; j++) ss += x[j] * x[j];
            const float inv = 1.0f / sqrtf(ss / (float)D + eps);
            for (int64_t j = 0; j < half; j++) {
                const float y1 = x[j] * inv * w[j], y2 = x[j + half] * inv * w[j + half];
                o[j] = y1 * c[j] - y2 * s[j];
                o[j + half] = y2 * c[j + half] + y1 * s[j + half];
            }
        }
    }
}

/* x rows [gate | up] of 2n; out [rows, n] = gate / (1 + e^-gate) * up. */
void silu_and_mul(const float *x, int64_t x_stride, float *out, int64_t rows, int64_t n,
                  int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict g = x + i * x_stride, *restrict u = g + n;
        float *restrict o = out + i * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) o[j] = g[j] / (1.0f + exp_approx(-g[j])) * u[j];
    }
}

/* Sampling penalties in place on x [rows, vocab] (float32, row stride x_stride): row i reads
   its slot's output-token counts (counts [slots, vocab] int32) and prompt marks (seen [slots,
   vocab] bytes, NULL: no repetition penalty); a seen token's logit is divided by rep[i] when
   positive, multiplied when not; then x -= freq[i] * count + pres[i] * (count > 0). The three
   parameters are read with param_stride (columns of one table). */
void penalize(float *x, int64_t x_stride, const int64_t *slots, const int32_t *counts,
              const uint8_t *seen, const float *rep, const float *pres, const float *freq,
              int64_t param_stride, int64_t rows, int64_t vocab, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * vocab >= 65536)
    for (int64_t i = 0; i < rows; i++) {
        float *restrict r = x + i * x_stride;
        const int32_t *restrict c = counts + slots[i] * vocab;
        const uint8_t *restrict s = seen ? seen + slots[i] * vocab : NULL;
        const float p = rep[i * param_stride], inv = 1.0f / p;
        const float fp = freq[i * param_stride], pp = pres[i * param_stride];
        for (int64_t j = 0; j < vocab; j++) {
            const float n = (float)c[j];
            float v = r[j];
            if (s && (s[j] || c[j] > 0)) v = v < 0 ? v * p : v * inv;
            r[j] = v - fp * n - (c[j] > 0 ? pp : 0.0f);
        }
    }
}
