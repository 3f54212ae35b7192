/*
 * Decode attention over the paged KV cache on a CPU, float32: the "cpu" attention backend's
 * kernel (see cpu_backend.py, which compiles this file once per machine and calls it through
 * ctypes).
 *
 * One task per (sequence, K/V head), spread over OpenMP threads (torch's own OpenMP runtime,
 * so no second thread pool). A task first writes its sequence's new K/V row into the cache
 * slot, then walks the sequence's keys in order through its block table, in tiles of TILE
 * keys: each key row is read once from the cache for all `group` query heads that share the
 * K/V head (GQA), with no gathered copy. Softmax is the online form of flash attention: a
 * running maximum m, sum l and unnormalised accumulator acc per query head; a tile of scores
 * s updates m' = max(m, max s), alpha = e^(m - m'), p = e^(s - m'), l' = alpha l + sum p,
 * acc' = alpha acc + p V; the output is acc / l (zeros for a sequence with no keys).
 *
 * Layouts (all float32 or int64, the last dimension contiguous):
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

/* e^x for x <= 0 (scores minus their maximum), within about 2 ulp of expf: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n through the exponent bits. Branch-free,
 * so the compiler vectorises the loops that call it. Below -87 the result is clamped to
 * e^-87 (about 1.6e-38), which weighs nothing next to the maximum's 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
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
            for (int64_t j = 0; j < n; j++) mx = pg[j] > mx ? pg[j] : mx;
            const float alpha = m[g] == -INFINITY ? 0.0f : exp_nonpositive(m[g] - mx);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < n; j++) {
                pg[j] = exp_nonpositive(pg[j] - mx);
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

void decode_attention_f32(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                          const float *v_new, int64_t v_stride, const int64_t *slots,
                          float *k_cache, float *v_cache, const int64_t *tables,
                          int64_t table_stride, const int64_t *lens, float *out,
                          int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                          int64_t head_dim, int64_t block_size, float scale, int num_threads) {
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
