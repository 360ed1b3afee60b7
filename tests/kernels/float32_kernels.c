/* The float32 kernels on fixed inputs, their outputs written raw to argv[1]: built for two CPUs,
 * the two files must be the same bytes (tests/test_kernel_builds.py). Compiled with -I at
 * decoding/kernels. */
#include "invariant.c"
#include <stdio.h>
static uint32_t st = 12345u;
static float rnd(void) { st = st * 1664525u + 1013904223u; return ((float)(st >> 8) / 16777216.0f) * 2.0f - 1.0f; }
static void fill(float *p, int n) { for (int i = 0; i < n; i++) p[i] = rnd(); }
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "wb");
    /* linear: 5 rows, K 96, N 40, packed [3, 96, 16] */
    enum { K = 96, N = 40, R = 5, NP = 3 };
    static float W[N * K], P[NP * K * 16], x[R * K], y[R * N];
    fill(W, N * K); fill(x, R * K);
    memset(P, 0, sizeof P);
    for (int n = 0; n < N; n++) for (int k = 0; k < K; k++) P[((n / 16) * K + k) * 16 + n % 16] = W[n * K + k];
    for (int r = 1; r <= R; r++) {          /* each row count: row 0's result must not move */
        sense_linear_f32(x, P, (int64_t)16 * K, y, y, 0, 0, 0, r, K, N, 1);
        fwrite(y, sizeof(float), (size_t)r * N, f);
    }
    /* attention: 3 rows after 17 cached positions, 4 heads over 2 groups, D 64, causal */
    enum { T = 3, H = 4, G = 2, D = 64, L = 20 };
    static float q[T * H * D], kc[G * L * D], vc[G * L * D], o[T * H * D];
    fill(q, T * H * D); fill(kc, G * L * D); fill(vc, G * L * D);
    int32_t rowptr[T + 1], idx[64]; int at = 0;
    for (int i = 0; i < T; i++) { rowptr[i] = at; for (int j = 0; j <= L - T + i; j++) idx[at++] = j; }
    rowptr[T] = at;
    sense_attention_f32(q, H * D, kc, vc, (int64_t)G * L * D, (int64_t)L * D, D, rowptr, idx, o, H * D, 0, 1, T, H, G, D,
                        0.125f, 0.0f, 1);
    fwrite(o, sizeof(float), T * H * D, f);
    /* rmsnorm and the SiLU gate */
    static float xn[3 * K], w[K], on[3 * K], gu[3 * 2 * 48], og[3 * 48];
    fill(xn, 3 * K); fill(w, K); fill(gu, 3 * 2 * 48);
    sense_rmsnorm(xn, w, on, 3, K, 1e-5f, 0, 1);
    sense_silu_mul(gu, og, 3, 48, 0, 1);
    fwrite(on, sizeof(float), 3 * K, f);
    fwrite(og, sizeof(float), 3 * 48, f);
    fclose(f);
    printf("%s\n", sense_kernel_isa());
    return 0;
}
