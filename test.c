/* test.c - gradient checks and unit tests for stochca.h and train.c.

   The header is built in double precision here (STOCHCA_DOUBLE), so that
   central finite differences agree with the analytic gradients to about
   1e-9 relative error. The tolerance below is far tighter than the error
   that any single wrong term in a backward pass produces.

   Test names start with the equation of PAPER_NOTES.md that they check.
   The program prints one line per check with its worst error, then
   "N passed, M failed", and exits non-zero if any check failed. */
#include <stddef.h>

/* Every allocation of the header goes through these, so a test can make
   the k-th allocation fail and count what is still allocated. */
static void *counting_malloc(size_t size);
static void counting_free(void *p);
#define STOCHCA_MALLOC(n) counting_malloc(n)
#define STOCHCA_FREE(p) counting_free(p)
#define STOCHCA_DOUBLE
#define STOCHCA_IMPLEMENTATION
#include "stochca.h"
#define STOCHCA_TRAIN_NO_MAIN
#include "train.c"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>  /* WEXITSTATUS for the driver tests, which need a POSIX shell */

#define FD_STEP 1e-6      /* central-difference step */
#define GRAD_RTOL 1e-6    /* relative tolerance of a gradient check */
#define GRAD_ATOL 1e-9    /* absolute tolerance, for gradients near zero */

static int tests_passed, tests_failed;
static long allocations_live;     /* header allocations not yet freed */
static long allocations_until_failure; /* 0: never fail; k: the k-th allocation from now fails */
static int allocation_failed;     /* set when an injected failure happened */

static void *counting_malloc(size_t size)
{
    void *p;
    if (allocations_until_failure > 0 && --allocations_until_failure == 0) {
        allocation_failed = 1;
        return NULL;
    }
    p = malloc(size);
    if (p)
        allocations_live++;
    return p;
}

static void counting_free(void *p)
{
    if (p)
        allocations_live--;
    free(p);
}

static void report(const char *name, int ok, const char *detail)
{
    printf("%-48s %s  %s\n", name, ok ? "ok  " : "FAIL", detail);
    if (ok)
        tests_passed++;
    else
        tests_failed++;
}

/* Compares analytic with numeric gradients elementwise:
   |a - n| <= GRAD_ATOL + GRAD_RTOL * max(|a|, |n|). */
static void check_gradient(const char *name, const double *analytic, const double *numeric, size_t n)
{
    double worst = 0, worst_ratio = 0, max_abs = 0;
    size_t i;
    char detail[128];
    for (i = 0; i < n; i++) {
        double diff = fabs(analytic[i] - numeric[i]);
        double scale = fmax(fabs(analytic[i]), fabs(numeric[i]));
        double ratio = diff / (GRAD_ATOL + GRAD_RTOL * scale);
        if (ratio > worst_ratio || isnan(diff)) {
            worst_ratio = isnan(diff) ? INFINITY : ratio;
            worst = diff;
        }
        if (scale > max_abs)
            max_abs = scale;
    }
    snprintf(detail, sizeof detail, "max |error| %.2e over %zu values, max |grad| %.2e", worst, n, max_abs);
    /* A gradient that is zero everywhere would pass trivially, so it fails. */
    report(name, worst_ratio <= 1.0 && max_abs > 0, detail);
}

static void check_true(const char *name, int condition, const char *detail)
{
    report(name, condition, detail);
}

static void fill_random(double *x, size_t n, double low, double high, stochca_rng *rng)
{
    size_t i;
    for (i = 0; i < n; i++)
        x[i] = low + (high - low) * stochca_rng_uniform(rng);
}

static double *new_array(size_t n)
{
    double *x = (double *)calloc(n ? n : 1, sizeof(double));
    if (!x) {
        fprintf(stderr, "test: out of memory\n");
        exit(2);
    }
    return x;
}

/* ---------------------------------------------------------------------------
   Finite differences: d loss / d x[i] for a loss that reads x. */

typedef double (*loss_fn)(void *ctx);

static void numeric_gradient(loss_fn loss, void *ctx, double *x, size_t n, double *grad)
{
    size_t i;
    for (i = 0; i < n; i++) {
        const double saved = x[i];
        double plus, minus;
        x[i] = saved + FD_STEP;
        plus = loss(ctx);
        x[i] = saved - FD_STEP;
        minus = loss(ctx);
        x[i] = saved;
        grad[i] = (plus - minus) / (2 * FD_STEP);
    }
}

/* Backward functions add into their outputs. The kernel tests fill the
   gradient buffers with this pattern first and subtract it afterwards, so
   a kernel that overwrites instead of adding fails. */
static double prior_value(size_t i)
{
    return 0.25 * (double)(i % 7 + 1);
}

static void add_prior(double *x, size_t n, double sign)
{
    size_t i;
    for (i = 0; i < n; i++)
        x[i] += sign * prior_value(i);
}

/* Runs one gradient check of `param` (n values) against its analytic gradient. */
static void check_param(const char *name, loss_fn loss, void *ctx, double *param, const double *analytic,
                        size_t n)
{
    double *numeric = new_array(n);
    numeric_gradient(loss, ctx, param, n, numeric);
    check_gradient(name, analytic, numeric, n);
    free(numeric);
}

static double weighted_sum(const double *x, const double *weights, size_t n)
{
    double s = 0;
    size_t i;
    for (i = 0; i < n; i++)
        s += x[i] * weights[i];
    return s;
}

/* ---------------------------------------------------------------------------
   Kernel gradient checks. Each uses the loss sum(out * R) with random R,
   so dout = R and every output element matters. */

enum { KB = 2, KT = 5, KD = 8, KH = 2, KM = 12, KK = 4 };

typedef struct {
    double *inp, *w, *b, *out, *r, *scratch;
    int R, I, O;
} linear_case;

static double linear_loss(void *ctx)
{
    linear_case *c = (linear_case *)ctx;
    stochca_linear_forward(c->out, c->inp, c->w, c->b, c->scratch, c->R, c->I, c->O);
    return weighted_sum(c->out, c->r, (size_t)c->R * c->O);
}

static void test_linear(stochca_rng *rng)
{
    linear_case c;
    double *dinp, *dw, *db;
    c.R = 7; c.I = 5; c.O = 6;
    c.inp = new_array(35); c.w = new_array(30); c.b = new_array(6);
    c.out = new_array(42); c.r = new_array(42); c.scratch = new_array(30);
    dinp = new_array(35); dw = new_array(30); db = new_array(6);
    fill_random(c.inp, 35, -1, 1, rng);
    fill_random(c.w, 30, -1, 1, rng);
    fill_random(c.b, 6, -1, 1, rng);
    fill_random(c.r, 42, -1, 1, rng);

    add_prior(dinp, 35, 1); add_prior(dw, 30, 1); add_prior(db, 6, 1);
    stochca_linear_backward(dinp, dw, db, c.r, c.inp, c.w, c.R, c.I, c.O);
    add_prior(dinp, 35, -1); add_prior(dw, 30, -1); add_prior(db, 6, -1);
    check_param("eq1,4,6 linear: d input", linear_loss, &c, c.inp, dinp, 35);
    check_param("eq1,4,6 linear: d weight", linear_loss, &c, c.w, dw, 30);
    check_param("eq1,4,6 linear: d bias", linear_loss, &c, c.b, db, 6);
    free(c.inp); free(c.w); free(c.b); free(c.out); free(c.r); free(c.scratch);
    free(dinp); free(dw); free(db);
}

typedef struct {
    double *patch_emb, *cls, *pos, *z, *r;
} embed_case;

static double embed_loss(void *ctx)
{
    embed_case *c = (embed_case *)ctx;
    stochca_embed_forward(c->z, c->patch_emb, c->cls, c->pos, KB, KT, KD);
    return weighted_sum(c->z, c->r, KB * KT * KD);
}

static void test_embed(stochca_rng *rng)
{
    embed_case c;
    double *dpatch = new_array(KB * (KT - 1) * KD), *dcls = new_array(KD), *dpos = new_array(KT * KD);
    c.patch_emb = new_array(KB * (KT - 1) * KD); c.cls = new_array(KD); c.pos = new_array(KT * KD);
    c.z = new_array(KB * KT * KD); c.r = new_array(KB * KT * KD);
    fill_random(c.patch_emb, KB * (KT - 1) * KD, -1, 1, rng);
    fill_random(c.cls, KD, -1, 1, rng);
    fill_random(c.pos, KT * KD, -1, 1, rng);
    fill_random(c.r, KB * KT * KD, -1, 1, rng);

    add_prior(dpatch, KB * (KT - 1) * KD, 1); add_prior(dcls, KD, 1); add_prior(dpos, KT * KD, 1);
    stochca_embed_backward(dpatch, dcls, dpos, c.r, KB, KT, KD);
    add_prior(dpatch, KB * (KT - 1) * KD, -1); add_prior(dcls, KD, -1); add_prior(dpos, KT * KD, -1);
    check_param("eq2 embedding: d patch embeddings", embed_loss, &c, c.patch_emb, dpatch, KB * (KT - 1) * KD);
    check_param("eq2 embedding: d class token", embed_loss, &c, c.cls, dcls, KD);
    check_param("eq2 embedding: d position embedding", embed_loss, &c, c.pos, dpos, KT * KD);
    free(c.patch_emb); free(c.cls); free(c.pos); free(c.z); free(c.r);
    free(dpatch); free(dcls); free(dpos);
}

typedef struct {
    double *inp, *w, *b, *out, *mean, *rstd, *r;
    int stride, rows;
} layernorm_case;

static double layernorm_loss(void *ctx)
{
    layernorm_case *c = (layernorm_case *)ctx;
    stochca_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->stride, c->w, c->b, c->rows, KD);
    return weighted_sum(c->out, c->r, (size_t)c->rows * KD);
}

/* stride KD: dense rows (eq3); stride KT*KD: class-token rows only (eq8). */
static void test_layernorm_case(const char *prefix, int stride, int rows, stochca_rng *rng)
{
    layernorm_case c;
    const size_t n_inp = (size_t)rows * stride;
    double *dinp = new_array(n_inp), *dw = new_array(KD), *db = new_array(KD);
    char name[96];
    c.stride = stride; c.rows = rows;
    c.inp = new_array(n_inp); c.w = new_array(KD); c.b = new_array(KD);
    c.out = new_array((size_t)rows * KD); c.r = new_array((size_t)rows * KD);
    c.mean = new_array(rows); c.rstd = new_array(rows);
    fill_random(c.inp, n_inp, -2, 2, rng);
    fill_random(c.w, KD, 0.5, 1.5, rng);
    fill_random(c.b, KD, -1, 1, rng);
    fill_random(c.r, (size_t)rows * KD, -1, 1, rng);

    layernorm_loss(&c);
    add_prior(dinp, n_inp, 1); add_prior(dw, KD, 1); add_prior(db, KD, 1);
    stochca_layernorm_backward(dinp, dw, db, c.r, c.inp, stride, c.w, c.mean, c.rstd, rows, KD);
    add_prior(dinp, n_inp, -1); add_prior(dw, KD, -1); add_prior(db, KD, -1);
    snprintf(name, sizeof name, "%s: d input", prefix);
    check_param(name, layernorm_loss, &c, c.inp, dinp, n_inp);
    snprintf(name, sizeof name, "%s: d weight", prefix);
    check_param(name, layernorm_loss, &c, c.w, dw, KD);
    snprintf(name, sizeof name, "%s: d bias", prefix);
    check_param(name, layernorm_loss, &c, c.b, db, KD);
    free(c.inp); free(c.w); free(c.b); free(c.out); free(c.r); free(c.mean); free(c.rstd);
    free(dinp); free(dw); free(db);
}

static void test_layernorm(stochca_rng *rng)
{
    test_layernorm_case("eq3 LayerNorm", KD, KB * KT, rng);
    test_layernorm_case("eq8 final LayerNorm of class tokens", KT * KD, KB, rng);
}

/* Attention with queries in a packed (B,T,3D) buffer and keys/values either
   from the same buffer (self) or from a separate (B,T,2D) buffer (cross). */
typedef struct {
    double *q, *k, *v, *out, *probs, *r, *scratch;
    int q_stride, kv_stride;
} attention_case;

static double attention_loss(void *ctx)
{
    attention_case *c = (attention_case *)ctx;
    stochca_attention_forward(c->out, c->probs, c->scratch, c->q, c->q_stride, c->k, c->v, c->kv_stride, KB, KT, KD, KH);
    return weighted_sum(c->out, c->r, KB * KT * KD);
}

static void test_attention(stochca_rng *rng)
{
    const size_t n_qkv = KB * KT * 3 * KD, n_kv0 = KB * KT * 2 * KD, n_out = KB * KT * KD;
    double *qkv = new_array(n_qkv), *kv0 = new_array(n_kv0), *dqkv = new_array(n_qkv);
    double *dkv0 = new_array(n_kv0), *dprobs = new_array(KB * KH * KT * KT);
    attention_case c;
    c.out = new_array(n_out); c.r = new_array(n_out); c.probs = new_array(KB * KH * KT * KT);
    c.scratch = new_array(n_out);
    fill_random(qkv, n_qkv, -1.5, 1.5, rng);
    fill_random(kv0, n_kv0, -1.5, 1.5, rng);
    fill_random(c.r, n_out, -1, 1, rng);

    /* Self-attention: q, k, v interleaved in one (B,T,3D) buffer. */
    c.q = qkv; c.k = qkv + KD; c.v = qkv + 2 * KD; c.q_stride = 3 * KD; c.kv_stride = 3 * KD;
    attention_loss(&c);
    add_prior(dqkv, n_qkv, 1);
    stochca_attention_backward(dqkv, dqkv + KD, dqkv + 2 * KD, dprobs, c.scratch, c.r, c.probs, c.q, c.q_stride,
                               c.k, c.v, c.kv_stride, KB, KT, KD, KH);
    add_prior(dqkv, n_qkv, -1);
    check_param("eq5 self-attention: d q, k, v", attention_loss, &c, qkv, dqkv, n_qkv);

    /* Cross-attention: queries from qkv, keys and values from kv0 (eq10). */
    memset(dqkv, 0, n_qkv * sizeof(double));
    c.k = kv0; c.v = kv0 + KD; c.kv_stride = 2 * KD;
    attention_loss(&c);
    add_prior(dqkv, n_qkv, 1); add_prior(dkv0, n_kv0, 1);
    stochca_attention_backward(dqkv, dkv0, dkv0 + KD, dprobs, c.scratch, c.r, c.probs, c.q, c.q_stride,
                               c.k, c.v, c.kv_stride, KB, KT, KD, KH);
    add_prior(dqkv, n_qkv, -1); add_prior(dkv0, n_kv0, -1);
    check_param("eq10 cross-attention: d queries", attention_loss, &c, qkv, dqkv, n_qkv / 3 * 3);
    check_param("eq10 cross-attention: d pretrained k, v", attention_loss, &c, kv0, dkv0, n_kv0);
    free(qkv); free(kv0); free(dqkv); free(dkv0); free(dprobs); free(c.out); free(c.r); free(c.probs); free(c.scratch);
}

typedef struct {
    double *inp, *out, *r;
    size_t n;
} gelu_case;

static double gelu_loss(void *ctx)
{
    gelu_case *c = (gelu_case *)ctx;
    stochca_gelu_forward(c->out, c->inp, c->n);
    return weighted_sum(c->out, c->r, c->n);
}

/* Scores far beyond exp's range: the softmax must subtract the row maximum. */
static void test_attention_large_scores(void)
{
    /* One image, two tokens, one head of width 1: q = (1, 1), k = (0, 2e4). */
    double q[2] = {1, 1}, k[2] = {0, 2e4}, v[2] = {3, 5}, out[2], probs[4], scratch[2];
    char detail[96];
    stochca_attention_forward(out, probs, scratch, q, 1, k, v, 1, 1, 2, 1, 1);
    snprintf(detail, sizeof detail, "probabilities %g %g, output %g", probs[0], probs[1], out[0]);
    check_true("eq5 softmax of huge scores stays finite", probs[0] == 0 && probs[1] == 1 && out[0] == 5 && out[1] == 5,
               detail);
}

static void test_gelu(stochca_rng *rng)
{
    gelu_case c;
    double *dinp = new_array(40);
    c.n = 40;
    c.inp = new_array(40); c.out = new_array(40); c.r = new_array(40);
    fill_random(c.inp, 40, -4, 4, rng);
    fill_random(c.r, 40, -1, 1, rng);
    add_prior(dinp, c.n, 1);
    stochca_gelu_backward(dinp, c.inp, c.r, c.n);
    add_prior(dinp, c.n, -1);
    check_param("eq7 GELU: d input", gelu_loss, &c, c.inp, dinp, c.n);

    /* GELU(x) = x Phi(x): GELU(1) = Phi(1) = 0.8413447460685429. */
    c.inp[0] = 1.0;
    stochca_gelu_forward(c.out, c.inp, 1);
    check_true("eq7 GELU: exact erf form at x = 1", fabs(c.out[0] - 0.8413447460685429) < 1e-15,
               "GELU(1) = Phi(1)");
    free(c.inp); free(c.out); free(c.r); free(dinp);
}

/* Error of a float result in units in the last place of the float nearest
   to the exact value; 0 when both are 0. */
static double ulp_error(float got, double exact)
{
    const float nearest = (float)exact;
    const double ulp = (double)nextafterf(fabsf(nearest), INFINITY) - fabsf(nearest);
    return fabs((double)got - exact) / ulp;
}

/* The float build's exp and erf against libm's double versions on every
   61st float bit pattern of each sign (70 million arguments), and on
   infinities and NaN. */
static void test_float_exp_erf(void)
{
    double worst_exp = 0, worst_erf = 0;
    float at_exp = 0, at_erf = 0;
    uint32_t bits;
    int sign, specials;
    char detail[160];
    for (bits = 0; bits < 0x7f800000u; bits += 61)
        for (sign = 0; sign < 2; sign++) {
            const uint32_t b = bits | (sign ? 0x80000000u : 0);
            float x;
            double e;
            memcpy(&x, &b, sizeof x);
            if (exp((double)x) < FLT_MAX && (e = ulp_error(stochca__exp_float(x), exp((double)x))) > worst_exp) {
                worst_exp = e;
                at_exp = x;
            }
            if ((e = ulp_error(stochca__erf_float(x), erf((double)x))) > worst_erf) {
                worst_erf = e;
                at_erf = x;
            }
        }
    specials = stochca__exp_float(INFINITY) == INFINITY && stochca__exp_float(-INFINITY) == 0 &&
               stochca__exp_float(89.0f) == INFINITY && isnan(stochca__exp_float(NAN));
    snprintf(detail, sizeof detail, "max %.3f ulp at %g; infinities and NaN as libm", worst_exp, at_exp);
    check_true("exp for the float build", worst_exp < 0.61 && specials, detail);
    specials = stochca__erf_float(INFINITY) == 1 && stochca__erf_float(-INFINITY) == -1 &&
               isnan(stochca__erf_float(NAN));
    snprintf(detail, sizeof detail, "max %.3f ulp at %g; infinities and NaN as libm", worst_erf, at_erf);
    check_true("erf for the float build (eq7 GELU)", worst_erf < 0.61 && specials, detail);
}

typedef struct {
    double *a, *b, *out, *r;
} residual_case;

static double residual_loss(void *ctx)
{
    residual_case *c = (residual_case *)ctx;
    stochca_residual_forward(c->out, c->a, c->b, 20);
    return weighted_sum(c->out, c->r, 20);
}

static void test_residual(stochca_rng *rng)
{
    residual_case c;
    double *da = new_array(20), *db = new_array(20);
    c.a = new_array(20); c.b = new_array(20); c.out = new_array(20); c.r = new_array(20);
    fill_random(c.a, 20, -1, 1, rng);
    fill_random(c.b, 20, -1, 1, rng);
    fill_random(c.r, 20, -1, 1, rng);
    add_prior(da, 20, 1); add_prior(db, 20, 1);
    stochca_residual_backward(da, db, c.r, 20);
    add_prior(da, 20, -1); add_prior(db, 20, -1);
    check_param("eq6 residual: d first input", residual_loss, &c, c.a, da, 20);
    check_param("eq6 residual: d second input", residual_loss, &c, c.b, db, 20);
    free(c.a); free(c.b); free(c.out); free(c.r); free(da); free(db);
}

typedef struct {
    double *logits, *probs, *losses;
    int labels[KB * 3];
} crossentropy_case;

static double crossentropy_loss(void *ctx)
{
    crossentropy_case *c = (crossentropy_case *)ctx;
    return stochca_crossentropy_forward(c->losses, c->probs, c->logits, c->labels, KB * 3, KK);
}

static void test_crossentropy(stochca_rng *rng)
{
    crossentropy_case c;
    double *dlogits = new_array(KB * 3 * KK), expected;
    int i;
    c.logits = new_array(KB * 3 * KK); c.probs = new_array(KB * 3 * KK); c.losses = new_array(KB * 3);
    fill_random(c.logits, KB * 3 * KK, -3, 3, rng);
    for (i = 0; i < KB * 3; i++)
        c.labels[i] = i % KK;
    crossentropy_loss(&c);
    add_prior(dlogits, KB * 3 * KK, 1);
    stochca_crossentropy_backward(dlogits, c.probs, c.labels, KB * 3, KK);
    add_prior(dlogits, KB * 3 * KK, -1);
    check_param("eq9 softmax cross-entropy: d logits", crossentropy_loss, &c, c.logits, dlogits, KB * 3 * KK);

    /* Logits (0, ln 3) with label 1: softmax = (1/4, 3/4), loss = ln(4/3). */
    c.logits[0] = 0; c.logits[1] = log(3.0); c.labels[0] = 1;
    expected = log(4.0 / 3.0);
    check_true("eq9 softmax cross-entropy: value by hand",
               fabs(stochca_crossentropy_forward(c.losses, c.probs, c.logits, c.labels, 1, 2) - expected) < 1e-15,
               "loss of logits (0, ln 3), label 1 is ln(4/3)");
    free(c.logits); free(c.probs); free(c.losses); free(dlogits);
}

/* ---------------------------------------------------------------------------
   Whole-model checks on a tiny ViT: S 8, C 2, P 4 (N 4, T 5), D 8, L 3,
   H 2, M 12, K 3, B 2. Every parameter is random, including the LayerNorm
   weights and the head, so no gradient term is hidden by a 0 or a 1. */

enum { MB = 2 };

static stochca_config tiny_config(void)
{
    stochca_config c;
    c.image_size = 8; c.channels = 2; c.patch_size = 4; c.dim = 8;
    c.depth = 3; c.heads = 2; c.mlp_dim = 12; c.classes = 3;
    return c;
}

static void init_tiny_model(stochca_model *m, int training, stochca_rng *rng)
{
    stochca_config c = tiny_config();
    stochca_error err;
    if (stochca_model_init(m, &c, &err) != STOCHCA_OK || stochca_model_reserve(m, MB, training, &err) != STOCHCA_OK) {
        fprintf(stderr, "test: %s\n", err.message);
        exit(2);
    }
    fill_random(m->param_memory, m->num_params, -0.5, 0.5, rng);
}

typedef struct {
    stochca_model *target;
    stochca_model *pretrained;
    const double *images;
    const int *labels;
    const unsigned char *cross;
    stochca_kv kv;
} model_case;

static double model_loss(void *ctx)
{
    model_case *c = (model_case *)ctx;
    stochca_error err;
    if (stochca_forward(c->target, c->images, c->labels, MB, c->cross, &c->kv, &err) != STOCHCA_OK) {
        fprintf(stderr, "test: %s\n", err.message);
        exit(2);
    }
    return c->target->loss;
}

/* Checks d loss / d theta for every parameter tensor, one check per tensor kind. */
static void check_model_gradients(const char *prefix, model_case *c)
{
    stochca_model *m = c->target;
    stochca_error err;
    double *numeric = new_array(m->num_params);
    int i, l, n = stochca_num_tensors(&m->config), all_cross = c->cross != NULL;

    for (l = 0; l < m->config.depth; l++)
        all_cross &= c->cross && c->cross[l];

    model_loss(c);
    stochca_zero_grad(m);
    if (stochca_backward(m, &err) != STOCHCA_OK) {
        fprintf(stderr, "test: %s\n", err.message);
        exit(2);
    }
    numeric_gradient(model_loss, c, m->param_memory, m->num_params, numeric);
    for (i = 0; i < n; i++) {
        stochca_tensor_info info;
        char name[160];
        stochca_tensor_info_at(&m->config, i, &info);
        snprintf(name, sizeof name, "%s: %s", prefix, info.name);
        if (strncmp(info.name, "conv_proj", 9) == 0 && all_cross) {
            /* With every block in cross-attention, patch tokens never reach
               the class token: their keys and values are replaced by K0, V0. */
            size_t k, nonzero = 0;
            for (k = 0; k < info.numel; k++)
                nonzero += m->grad_memory[info.offset + k] != 0 || fabs(numeric[info.offset + k]) > 1e-12;
            check_true(name, nonzero == 0, "zero gradient, as patch tokens cannot reach the class token");
        } else if (strstr(info.name, "in_proj") && c->cross && c->cross[(i - 4) / 12]) {
            /* Only the query rows of a cross-attention block's in_proj get gradient. */
            size_t rows = strstr(info.name, "weight") ? (size_t)m->config.dim * m->config.dim : (size_t)m->config.dim;
            check_gradient(name, m->grad_memory + info.offset, numeric + info.offset, rows);
        } else {
            check_gradient(name, m->grad_memory + info.offset, numeric + info.offset, info.numel);
        }
    }
    free(numeric);
}

/* Returns the largest |gradient| of the K and V rows of block l's in_proj. */
static double kv_rows_max_grad(const stochca_model *m, int l)
{
    const size_t d = (size_t)m->config.dim;
    double worst = 0;
    size_t i;
    for (i = d * d; i < 3 * d * d; i++)
        worst = fmax(worst, fabs(m->grads.block[l].qkv_w[i]));
    for (i = d; i < 3 * d; i++)
        worst = fmax(worst, fabs(m->grads.block[l].qkv_b[i]));
    return worst;
}

static void test_model_gradients(stochca_rng *rng)
{
    stochca_model target, pretrained;
    stochca_config c = tiny_config();
    double images[MB * 2 * 8 * 8];
    int labels[MB] = {2, 0};
    const unsigned char all_self[3] = {0, 0, 0}, all_cross[3] = {1, 1, 1}, mixed[3] = {1, 0, 1};
    model_case mc;
    stochca_error err;
    char detail[96];

    init_tiny_model(&target, 1, rng);
    init_tiny_model(&pretrained, 0, rng);
    fill_random(images, MB * 2 * 8 * 8, -1, 1, rng);
    mc.target = &target; mc.pretrained = &pretrained; mc.images = images; mc.labels = labels;
    if (stochca_pretrained_kv(&pretrained, images, MB, &mc.kv, &err) != STOCHCA_OK) {
        fprintf(stderr, "test: %s\n", err.message);
        exit(2);
    }

    mc.cross = all_self;
    check_model_gradients("eq1-9 model, all self-attention", &mc);
    mc.cross = all_cross;
    check_model_gradients("eq10 model, all cross-attention", &mc);
    mc.cross = mixed;
    check_model_gradients("eq10 model, mixed flags 1 0 1", &mc);

    /* After the mixed backward: K, V rows are exactly zero in blocks 0 and 2
       and nonzero in block 1, where the block used its own keys and values. */
    snprintf(detail, sizeof detail, "max |grad| %.1e %.1e, self block %.1e",
             kv_rows_max_grad(&target, 0), kv_rows_max_grad(&target, 2), kv_rows_max_grad(&target, 1));
    check_true("eq10 cross block: K, V rows get zero gradient",
               kv_rows_max_grad(&target, 0) == 0 && kv_rows_max_grad(&target, 2) == 0 &&
                   kv_rows_max_grad(&target, 1) > 0,
               detail);
    (void)c;
    stochca_model_free(&target);
    stochca_model_free(&pretrained);
}

/* ---------------------------------------------------------------------------
   StochCA properties */

static int same_bits(const double *a, const double *b, size_t n)
{
    return memcmp(a, b, n * sizeof(double)) == 0;
}

static void test_stochca_properties(stochca_rng *rng)
{
    stochca_model target, pretrained, other;
    double images[MB * 2 * 8 * 8], *plain_logits = new_array(MB * 3), *saved = NULL;
    int labels[MB] = {1, 2}, step;
    const unsigned char zeros[3] = {0, 0, 0}, mixed[3] = {0, 1, 1};
    stochca_kv kv;
    stochca_adamw opt = stochca_adamw_default();
    stochca_error err;

    init_tiny_model(&target, 1, rng);
    init_tiny_model(&pretrained, 0, rng);
    init_tiny_model(&other, 0, rng);
    fill_random(images, MB * 2 * 8 * 8, -1, 1, rng);

    /* All flags 0 is the plain ViT, bit for bit, whatever kv holds. */
    stochca_forward(&target, images, labels, MB, NULL, NULL, &err);
    memcpy(plain_logits, target.acts.logits, MB * 3 * sizeof(double));
    stochca_pretrained_kv(&pretrained, images, MB, &kv, &err);
    stochca_forward(&target, images, labels, MB, zeros, &kv, &err);
    check_true("eq10 flags all 0: plain ViT bit for bit", same_bits(plain_logits, target.acts.logits, MB * 3),
               "logits equal those of a forward without pretrained model");

    /* The pretrained model's parameters never change during training. */
    saved = new_array(pretrained.num_params);
    memcpy(saved, pretrained.param_memory, pretrained.num_params * sizeof(double));
    for (step = 0; step < 3; step++) {
        stochca_pretrained_kv(&pretrained, images, MB, &kv, &err);
        stochca_forward(&target, images, labels, MB, mixed, &kv, &err);
        stochca_zero_grad(&target);
        stochca_backward(&target, &err);
        stochca_adamw_update(&target, &opt);
    }
    check_true("eq10 pretrained model stays frozen", same_bits(saved, pretrained.param_memory, pretrained.num_params),
               "pretrained parameters unchanged after 3 StochCA steps");

    /* Evaluation (cross == NULL) ignores the pretrained model and the flags:
       run cross-attention with two different pretrained models in between. */
    stochca_forward(&target, images, NULL, MB, NULL, NULL, &err);
    memcpy(plain_logits, target.acts.logits, MB * 3 * sizeof(double));
    stochca_pretrained_kv(&other, images, MB, &kv, &err);
    stochca_forward(&target, images, labels, MB, mixed, &kv, &err);
    stochca_forward(&target, images, NULL, MB, NULL, NULL, &err);
    check_true("eq10 evaluation ignores pretrained model", same_bits(plain_logits, target.acts.logits, MB * 3),
               "evaluation logits equal before and after cross-attention forwards");

    /* A cross-attention forward really differs from self-attention. */
    stochca_forward(&target, images, labels, MB, mixed, &kv, &err);
    check_true("eq10 cross-attention changes the output", !same_bits(plain_logits, target.acts.logits, MB * 3),
               "logits with flags 0 1 1 differ from self-attention");

    /* Cross-attention without keys and values is rejected. */
    check_true("eq10 cross flags without kv rejected",
               stochca_forward(&target, images, labels, MB, mixed, NULL, &err) == STOCHCA_ERR_ARGUMENT &&
                   strstr(err.message, "stochca_pretrained_kv") != NULL,
               err.message);

    free(plain_logits);
    free(saved);
    stochca_model_free(&target);
    stochca_model_free(&pretrained);
    stochca_model_free(&other);
}

static void test_bernoulli_draws(void)
{
    stochca_rng rng;
    unsigned char cross[STOCHCA_MAX_DEPTH];
    long ones = 0, draws = 0;
    int step, l, all_zero = 1, all_one = 1;
    char detail[96];
    stochca_rng_seed(&rng, 7);
    for (step = 0; step < 2000; step++) {
        stochca_draw_cross(&rng, 0.3f, 10, cross);
        for (l = 0; l < 10; l++)
            ones += cross[l];
        draws += 10;
    }
    snprintf(detail, sizeof detail, "frequency %.4f over %ld draws, expected 0.3", (double)ones / draws, draws);
    /* The standard deviation of the frequency is sqrt(0.21 / 20000) = 0.0032. */
    check_true("eq11 Bernoulli(p) draws: frequency", fabs((double)ones / draws - 0.3) < 0.015, detail);
    for (step = 0; step < 100; step++) {
        stochca_draw_cross(&rng, 0.0f, 10, cross);
        for (l = 0; l < 10; l++)
            all_zero &= cross[l] == 0;
        stochca_draw_cross(&rng, 1.0f, 10, cross);
        for (l = 0; l < 10; l++)
            all_one &= cross[l] == 1;
    }
    check_true("eq11 Bernoulli(p) draws: p = 0 and p = 1", all_zero && all_one,
               "p = 0 never draws 1, p = 1 always draws 1");
}

/* ---------------------------------------------------------------------------
   AdamW and the learning-rate schedule */

static void test_adamw(stochca_rng *rng)
{
    stochca_model m;
    stochca_adamw opt = stochca_adamw_default();
    size_t head = 0;
    double backbone_expected, head_expected, backbone_no_decay;
    char detail[160];

    init_tiny_model(&m, 1, rng);
    head = (size_t)(m.params.head_w - m.param_memory);
    m.param_memory[0] = 0.5;
    m.grad_memory[0] = 0.2;
    m.param_memory[head] = -0.25;
    m.grad_memory[head] = -0.1;
    opt.lr = 0.1f;
    opt.weight_decay = 0.01f;
    opt.head_lr_scale = 10.0f;
    stochca_adamw_update(&m, &opt);

    /* Step 1 by hand, theta 0.5, g 0.2, lr 0.1, wd 0.01, betas (0.9, 0.999):
       decay 0.5 - 0.1 * 0.01 * 0.5 = 0.4995; m = 0.02, v = 4e-5;
       m_hat = 0.2, v_hat = 0.04; update 0.1 * 0.2 / (0.2 + 1e-8). */
    backbone_expected = 0.4995 - 0.1 * 0.2 / (0.2 + 1e-8);
    /* Head: lr 0.1 * 10 = 1, theta -0.25 decays to -0.2475, then moves by
       -1 * (-0.1) / (0.1 + 1e-8). */
    head_expected = -0.2475 + 0.1 / (0.1 + 1e-8);
    snprintf(detail, sizeof detail, "backbone %.12f (expected %.12f), head %.12f (expected %.12f)",
             m.param_memory[0], backbone_expected, m.param_memory[head], head_expected);
    check_true("eq12 AdamW step 1 by hand",
               fabs(m.param_memory[0] - backbone_expected) < 1e-7 && fabs(m.param_memory[head] - head_expected) < 1e-6,
               detail);

    /* With decay_head_only (L2-SP), the backbone is not decayed. */
    m.adam_step = 0;
    memset(m.adam_memory, 0, 2 * m.num_params * sizeof(double));
    m.param_memory[0] = 0.5;
    opt.decay_head_only = 1;
    stochca_adamw_update(&m, &opt);
    backbone_no_decay = 0.5 - 0.1 * 0.2 / (0.2 + 1e-8);
    snprintf(detail, sizeof detail, "backbone %.12f, expected %.12f", m.param_memory[0], backbone_no_decay);
    check_true("eq12 AdamW without backbone decay", fabs(m.param_memory[0] - backbone_no_decay) < 1e-7, detail);
    stochca_model_free(&m);
}

/* ---------------------------------------------------------------------------
   Matrix multiply: full 4x16 tiles and partial edge tiles, with A read as
   stored and transposed, against the plain triple loop. */

static void test_matmul_tiles(stochca_rng *rng)
{
    enum { M = 9, K = 300, N = 37 };
    double a[M * K], at[K * M], b[K * N], c[M * N], expected[M * N], worst = 0;
    int transposed, m, n, k;
    char detail[96];
    fill_random(a, M * K, -1, 1, rng);
    fill_random(b, K * N, -1, 1, rng);
    for (m = 0; m < M; m++)
        for (k = 0; k < K; k++)
            at[k * M + m] = a[m * K + k];
    for (transposed = 0; transposed < 2; transposed++) {
        stochca__matmul_args g = transposed ? stochca__mm(c, N, at, 1, M, b, N, M, K, N)
                                            : stochca__mm(c, N, a, K, 1, b, N, M, K, N);
        fill_random(c, M * N, -1, 1, rng);
        for (m = 0; m < M; m++)
            for (n = 0; n < N; n++) {
                double sum = c[m * N + n];
                for (k = 0; k < K; k++)
                    sum += a[m * K + k] * b[k * N + n];
                expected[m * N + n] = sum;
            }
        stochca__matmul(&g, transposed);
        for (m = 0; m < M * N; m++)
            worst = fmax(worst, fabs(c[m] - expected[m]));
    }
    snprintf(detail, sizeof detail, "max |error| %.1e over 9x37 outputs, K = 300 in two blocks, A as stored "
             "and transposed", worst);
    check_true("matrix multiply tiles and edges", worst < 1e-13, detail);
}

/* Two AdamW steps against the update written out in double precision,
   with betas and eps chosen so that swapping or dropping any of them shows. */
static void test_adamw_two_steps(stochca_rng *rng)
{
    stochca_model m;
    stochca_adamw opt = stochca_adamw_default();
    const double grads[2] = {0.3, -0.7};
    double theta[2] = {0.5, -0.25}, first[2] = {0, 0}, second[2] = {0, 0}, worst = 0;
    size_t index[2];
    int step, i;
    char detail[128];

    init_tiny_model(&m, 1, rng);
    index[0] = 5;
    index[1] = (size_t)(m.params.head_w - m.param_memory) + 2;
    opt.lr = 0.1f; opt.beta1 = 0.8f; opt.beta2 = 0.95f; opt.eps = 0.1f; opt.weight_decay = 0.2f;
    opt.head_lr_scale = 3.0f; opt.decay_head_only = 1;
    for (i = 0; i < 2; i++)
        m.param_memory[index[i]] = theta[i];
    for (step = 1; step <= 2; step++) {
        for (i = 0; i < 2; i++) {
            const double lr = i ? 0.1 * 3.0 : 0.1, decay = i ? (double)0.2f : 0;
            const double b1 = (double)0.8f, b2 = (double)0.95f;
            m.grad_memory[index[i]] = grads[i] * step;
            theta[i] -= (double)(float)lr * decay * theta[i];
            first[i] = b1 * first[i] + (1 - b1) * grads[i] * step;
            second[i] = b2 * second[i] + (1 - b2) * grads[i] * step * grads[i] * step;
            theta[i] -= (double)(float)lr * (first[i] / (1 - pow(b1, step))) /
                        (sqrt(second[i] / (1 - pow(b2, step))) + (double)0.1f);
        }
        stochca_adamw_update(&m, &opt);
    }
    for (i = 0; i < 2; i++)
        worst = fmax(worst, fabs(m.param_memory[index[i]] - theta[i]));
    snprintf(detail, sizeof detail, "max |error| %.1e; backbone %.9f, head %.9f", worst, theta[0], theta[1]);
    check_true("eq12 AdamW two steps, head decay only", worst < 1e-6, detail);
    stochca_model_free(&m);
}

static void test_schedule(void)
{
    const float base = 1e-3f;
    const long warmup = 100, total = 1000;
    float first = stochca_cosine_lr(base, 0, warmup, total);
    float peak = stochca_cosine_lr(base, warmup - 1, warmup, total);
    float after = stochca_cosine_lr(base, warmup, warmup, total);
    float last = stochca_cosine_lr(base, total - 1, warmup, total);
    float middle = stochca_cosine_lr(base, warmup + (total - warmup) / 2, warmup, total);
    double last_expected = 0.5 * base * (1 + cos(3.14159265358979323846 * 899.0 / 900.0));
    char detail[160];
    snprintf(detail, sizeof detail, "t=0 %.3e, t=99 %.3e, t=100 %.3e, middle %.3e, last %.3e",
             first, peak, after, middle, last);
    check_true("eq13 warm-up start is base / warmup", fabs(first - base / warmup) < 1e-10, detail);
    check_true("eq13 warm-up end reaches base", fabs(peak - base) < 1e-10 && fabs(after - base) < 1e-10, detail);
    check_true("eq13 cosine middle is base / 2", fabs(middle - base / 2) < 1e-9, detail);
    check_true("eq13 last step near zero", fabs(last - last_expected) < 1e-10 && last > 0, detail);
    check_true("eq13 no decay when warm-up is all", stochca_cosine_lr(base, 4, 5, 5) == base,
               "warmup == total gives the base rate, not 0/0");
    check_true("eq13 zero after the last step", stochca_cosine_lr(base, 1500, 100, 1000) == 0,
               "steps past total stay at 0");
}

static void test_l2sp(stochca_rng *rng)
{
    stochca_model m, pre;
    const float alpha = 0.01f;
    double penalty, expected = 0;
    size_t i, backbone;
    char detail[128];
    init_tiny_model(&m, 1, rng);
    init_tiny_model(&pre, 0, rng);
    backbone = (size_t)(m.params.head_w - m.param_memory);
    for (i = 0; i < backbone; i++)
        expected += 0.5 * alpha * (m.param_memory[i] - pre.param_memory[i]) * (m.param_memory[i] - pre.param_memory[i]);
    stochca_zero_grad(&m);
    add_prior(m.grad_memory, m.num_params, 1);
    penalty = stochca_l2sp(&m, &pre, alpha);
    add_prior(m.grad_memory, m.num_params, -1);
    snprintf(detail, sizeof detail, "penalty %.9f, expected %.9f", penalty, expected);
    check_true("eq14 L2-SP penalty value", fabs(penalty - expected) < 1e-9 * fmax(1, expected), detail);
    check_true("eq14 L2-SP gradient, head untouched",
               fabs(m.grad_memory[3] - alpha * (m.param_memory[3] - pre.param_memory[3])) < 1e-12 &&
                   m.grad_memory[backbone] == 0 && m.grad_memory[m.num_params - 1] == 0,
               "backbone gradient alpha * (theta - theta0); head gradient 0");
    stochca_model_free(&m);
    stochca_model_free(&pre);
}

/* ---------------------------------------------------------------------------
   Checkpoints */

static const char *const TMP_CHECKPOINT = "test_checkpoint.tmp.bin";

/* Writes `size` bytes of `bytes` to path. */
static void write_bytes(const char *path, const unsigned char *bytes, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(bytes, 1, size, f) != size) {
        fprintf(stderr, "test: cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

static unsigned char *read_bytes(const char *path, size_t *size)
{
    long n = 0;
    char msg[256];
    unsigned char *bytes = read_file(path, &n, msg, sizeof msg);
    if (!bytes) {
        fprintf(stderr, "test: %s\n", msg);
        exit(2);
    }
    *size = (size_t)n;
    return bytes;
}

/* Loads `bytes` as a checkpoint into m and checks the status and message. */
static void check_rejected(const char *name, stochca_model *m, const unsigned char *bytes, size_t size,
                           int expected_status, const char *expected_text)
{
    stochca_error err;
    int status;
    char detail[400];
    write_bytes(TMP_CHECKPOINT, bytes, size);
    err.message[0] = '\0';
    status = stochca_checkpoint_load(m, NULL, TMP_CHECKPOINT, &err);
    snprintf(detail, sizeof detail, "status %d, message: %s", status, err.message);
    check_true(name, status == expected_status && strstr(err.message, expected_text) != NULL, detail);
}

static void test_checkpoints(stochca_rng *rng)
{
    stochca_model m, loaded;
    stochca_config other = tiny_config();
    stochca_error err;
    stochca_rng saved_rng, loaded_rng;
    unsigned char *bytes, *copy;
    size_t size, second_size, i;
    int status;
    char detail[300];

    init_tiny_model(&m, 1, rng);
    init_tiny_model(&loaded, 1, rng);
    /* Values that float32 stores exactly, so the round trip must be exact. */
    for (i = 0; i < m.num_params; i++)
        m.param_memory[i] = (double)(float)m.param_memory[i];
    for (i = 0; i < 2 * m.num_params; i++)
        m.adam_memory[i] = (double)(float)(0.001 * (double)i);
    m.adam_step = 17;
    stochca_rng_seed(&saved_rng, 0x123456789ABCDEFull);

    status = stochca_checkpoint_save(&m, &saved_rng, TMP_CHECKPOINT, 1, &err);
    check_true("checkpoint save", status == STOCHCA_OK, status == STOCHCA_OK ? "saved" : err.message);
    status = stochca_checkpoint_load(&loaded, &loaded_rng, TMP_CHECKPOINT, &err);
    snprintf(detail, sizeof detail, "status %d, step %ld", status, loaded.adam_step);
    check_true("checkpoint round trip bit for bit",
               status == STOCHCA_OK && same_bits(m.param_memory, loaded.param_memory, m.num_params) &&
                   same_bits(m.adam_memory, loaded.adam_memory, 2 * m.num_params) && loaded.adam_step == 17 &&
                   loaded_rng.state == saved_rng.state,
               detail);

    bytes = read_bytes(TMP_CHECKPOINT, &size);
    stochca_checkpoint_save(&loaded, &loaded_rng, TMP_CHECKPOINT, 1, &err);
    copy = read_bytes(TMP_CHECKPOINT, &second_size);
    check_true("checkpoint save of a load is identical", size == second_size && memcmp(bytes, copy, size) == 0,
               "second file equals the first byte for byte");
    free(copy);
    check_true("checkpoint size is header plus 3Q floats", size == 64 + 4 * 3 * m.num_params, "optimizer state included");

    copy = (unsigned char *)malloc(size);
    memcpy(copy, bytes, size);
    copy[0] = 'X';
    check_rejected("checkpoint bad magic rejected", &loaded, copy, size, STOCHCA_ERR_FORMAT, "bad magic");
    memcpy(copy, bytes, size);
    copy[4] = 2;
    check_rejected("checkpoint wrong version rejected", &loaded, copy, size, STOCHCA_ERR_FORMAT,
                   "format version 2, but this build reads version 1");
    check_rejected("checkpoint truncated file rejected", &loaded, bytes, size - 10, STOCHCA_ERR_FORMAT,
                   "is truncated");
    check_rejected("checkpoint truncated header rejected", &loaded, bytes, 20, STOCHCA_ERR_FORMAT,
                   "shorter than its 64-byte header");
    memcpy(copy, bytes, size);
    memset(copy + 4 * 5, 0, 4);  /* header word 5 is D */
    check_rejected("checkpoint invalid configuration rejected", &loaded, copy, size, STOCHCA_ERR_FORMAT,
                   "is corrupt: invalid configuration: dim = 0");
    memcpy(copy, bytes, size);
    memcpy(copy + 64, "\x00\x00\xc0\x7f", 4);  /* a NaN as the first parameter */
    check_rejected("checkpoint NaN value rejected", &loaded, copy, size, STOCHCA_ERR_FORMAT, "not finite");
    free(copy);

    /* A valid checkpoint of another configuration names the field. */
    stochca_model_free(&loaded);
    other.dim = 12;
    other.heads = 3;
    if (stochca_model_init(&loaded, &other, &err) != STOCHCA_OK)
        exit(2);
    check_rejected("checkpoint configuration mismatch rejected", &loaded, bytes, size, STOCHCA_ERR_CONFIG,
                   "dim is 8 in the file but 12 in the model");
    status = stochca_checkpoint_load(&loaded, NULL, "no/such/file.bin", &err);
    check_true("checkpoint missing file rejected", status == STOCHCA_ERR_IO && strstr(err.message, "cannot open"),
               err.message);

    /* A failed save leaves the earlier file in place and no temporary file. */
    status = stochca_checkpoint_save(&m, NULL, "no/such/folder/model.bin", 0, &err);
    check_true("checkpoint save to missing folder fails", status == STOCHCA_ERR_IO && strstr(err.message, "cannot create"),
               err.message);

    free(bytes);
    remove(TMP_CHECKPOINT);
    stochca_model_free(&m);
    stochca_model_free(&loaded);
}

static void test_tensor_table(void)
{
    stochca_config c = tiny_config();
    stochca_tensor_info first, block, last;
    stochca_model m;
    stochca_error err;
    char detail[300];
    stochca_tensor_info_at(&c, 0, &first);
    stochca_tensor_info_at(&c, 4 + 12 + 2, &block);
    stochca_tensor_info_at(&c, stochca_num_tensors(&c) - 1, &last);
    stochca_model_init(&m, &c, &err);
    snprintf(detail, sizeof detail, "%s, %s (%d,%d) at %zu, %s ends at %zu of %zu", first.name, block.name,
             block.shape[0], block.shape[1], block.offset, last.name, last.offset + last.numel, m.num_params);
    check_true("state-dict order and shapes",
               !strcmp(first.name, "class_token") && first.shape[2] == 8 &&
                   !strcmp(block.name, "encoder.layers.encoder_layer_1.self_attention.in_proj_weight") &&
                   block.shape[0] == 24 && block.shape[1] == 8 &&
                   m.param_memory + block.offset == m.params.block[1].qkv_w &&
                   !strcmp(last.name, "heads.head.bias") && last.offset + last.numel == m.num_params,
               detail);
    stochca_model_free(&m);
}

static void test_config_validation(void)
{
    stochca_config c = tiny_config();
    stochca_error err;
    int status;
    c.dim = 9;
    status = stochca_config_validate(&c, &err);
    check_true("config dim not divisible by heads", status == STOCHCA_ERR_CONFIG &&
               strstr(err.message, "dim 9 is not divisible by heads 2"), err.message);
    c = tiny_config();
    c.patch_size = 3;
    status = stochca_config_validate(&c, &err);
    check_true("config image not divisible by patch", status == STOCHCA_ERR_CONFIG &&
               strstr(err.message, "image_size 8 is not divisible by patch_size 3"), err.message);
    c = tiny_config();
    c.depth = 0;
    status = stochca_config_validate(&c, &err);
    check_true("config zero depth", status == STOCHCA_ERR_CONFIG && strstr(err.message, "depth = 0"), err.message);
}

/* ---------------------------------------------------------------------------
   IDX reader of train.c */

static void put_be32(unsigned char *p, uint32_t x)
{
    p[0] = (unsigned char)(x >> 24);
    p[1] = (unsigned char)(x >> 16);
    p[2] = (unsigned char)(x >> 8);
    p[3] = (unsigned char)x;
}

/* Writes an IDX image file (n, side, side) and a label file of m labels. */
static void write_idx_pair(const char *images, const char *labels, int n, int side, int m, int bad_label)
{
    size_t image_size = 16 + (size_t)n * side * side, label_size = 8 + (size_t)m;
    unsigned char *buf = (unsigned char *)calloc(image_size > label_size ? image_size : label_size, 1);
    int i;
    put_be32(buf, 0x00000803u);
    put_be32(buf + 4, (uint32_t)n);
    put_be32(buf + 8, (uint32_t)side);
    put_be32(buf + 12, (uint32_t)side);
    write_bytes(images, buf, image_size);
    memset(buf, 0, label_size);
    put_be32(buf, 0x00000801u);
    put_be32(buf + 4, (uint32_t)m);
    for (i = 0; i < m; i++)
        buf[8 + i] = (unsigned char)(i % 10);
    if (bad_label)
        buf[8 + m - 1] = 12;
    write_bytes(labels, buf, label_size);
    free(buf);
}

static void check_idx(const char *name, const char *images, const char *labels, int expect_ok, const char *text)
{
    dataset d;
    char msg[1024] = "";
    int ok = load_dataset(&d, images, labels, 28, msg, sizeof msg);
    check_true(name, ok == expect_ok && (expect_ok || strstr(msg, text) != NULL), ok ? "loaded" : msg);
    if (ok)
        free_dataset(&d);
}

static void test_idx(void)
{
    const char *images = "test_images.tmp.idx", *labels = "test_labels.tmp.idx";
    static const unsigned char gzip_bytes[20] = {0x1f, 0x8b, 0x08, 0};
    unsigned char *bytes;
    size_t size;

    write_idx_pair(images, labels, 5, 28, 5, 0);
    check_idx("IDX valid pair loads", images, labels, 1, "");

    bytes = read_bytes(images, &size);
    write_bytes(images, bytes, size - 100);
    check_idx("IDX truncated images rejected", images, labels, 0, "is truncated: 3836 bytes, but its header describes 3936");
    write_bytes(images, bytes, 10);
    check_idx("IDX truncated header rejected", images, labels, 0, "shorter than its 16-byte IDX header");
    bytes[3] = 0x01;
    write_bytes(images, bytes, size);
    check_idx("IDX wrong magic rejected", images, labels, 0, "has IDX magic number 0x00000801, expected 0x00000803");
    free(bytes);

    write_bytes(images, gzip_bytes, sizeof gzip_bytes);
    check_idx("IDX gzip file rejected", images, labels, 0, "is gzip-compressed; decompress it first");

    write_idx_pair(images, labels, 5, 28, 4, 0);
    check_idx("IDX count mismatch rejected", images, labels, 0, "contains 5 images but");
    write_idx_pair(images, labels, 5, 28, 5, 1);
    check_idx("IDX label out of range rejected", images, labels, 0, "label 12 of image 4 is out of range");
    write_idx_pair(images, labels, 3, 32, 3, 0);
    check_idx("IDX other image shape rejected", images, labels, 0, "contains 32x32 images, but the model expects 28x28");
    check_idx("IDX missing file rejected", "no/such/images.idx", labels, 0, "cannot open 'no/such/images.idx'");

    remove(images);
    remove(labels);
}

/* ---------------------------------------------------------------------------
   Sweeps: rotation, Rotated MNIST, splits, summaries and the choice of p */

#define SIDE 28

static int count_nonzero(const unsigned char *image, int n)
{
    int i, count = 0;
    for (i = 0; i < n; i++)
        count += image[i] != 0;
    return count;
}

/* Total intensity and intensity-weighted center (row, col) of an image. */
static double image_mass(const unsigned char *image, double *row, double *col)
{
    double mass = 0, r = 0, c = 0;
    int i, j;
    for (i = 0; i < SIDE; i++)
        for (j = 0; j < SIDE; j++) {
            mass += image[i * SIDE + j];
            r += i * (double)image[i * SIDE + j];
            c += j * (double)image[i * SIDE + j];
        }
    *row = r / mass;
    *col = c / mass;
    return mass;
}

/* A Gaussian blob of peak 250 and standard deviation 2.5 pixels. */
static void draw_blob(unsigned char *image, double row, double col)
{
    int i, j;
    for (i = 0; i < SIDE; i++)
        for (j = 0; j < SIDE; j++) {
            const double d2 = (i - row) * (i - row) + (j - col) * (j - col);
            image[i * SIDE + j] = (unsigned char)floor(250 * exp(-d2 / (2 * 2.5 * 2.5)) + 0.5);
        }
}

static void test_rotation(stochca_rng *rng)
{
    unsigned char in[SIDE * SIDE], out[SIDE * SIDE];
    double mass_in, mass_out, row_in, col_in, row_out, col_out;
    char detail[200];
    int i;

    for (i = 0; i < SIDE * SIDE; i++)
        in[i] = (unsigned char)(stochca_rng_next(rng) & 255);
    rotate_image(out, in, SIDE, 0);
    check_true("rotation by 0 degrees is identity", memcmp(in, out, sizeof in) == 0,
               "random 28x28 image unchanged byte for byte");

    /* Counterclockwise by 90 degrees about (13.5, 13.5): (row, col) goes to (27 - col, row). */
    memset(in, 0, sizeof in);
    in[5 * SIDE + 20] = 200;
    rotate_image(out, in, SIDE, 90);
    snprintf(detail, sizeof detail, "pixel (5, 20) = 200 moved to (7, 5): %d there, %d nonzero pixels",
             out[7 * SIDE + 5], count_nonzero(out, SIDE * SIDE));
    check_true("rotation by 90 degrees moves pixel", out[7 * SIDE + 5] == 200, detail);
    check_true("rotation by 90 degrees moves nothing else", count_nonzero(out, SIDE * SIDE) == 1, detail);

    draw_blob(in, 13.5, 13.5);
    rotate_image(out, in, SIDE, 45);
    mass_in = image_mass(in, &row_in, &col_in);
    mass_out = image_mass(out, &row_out, &col_out);
    snprintf(detail, sizeof detail, "mass %.0f -> %.0f, center (%.2f, %.2f) -> (%.2f, %.2f)", mass_in, mass_out,
             row_in, col_in, row_out, col_out);
    check_true("rotation by 45 degrees keeps blob mass", fabs(mass_out / mass_in - 1) < 0.01, detail);
    check_true("rotation by 45 degrees keeps center", fabs(row_out - 13.5) < 0.05 && fabs(col_out - 13.5) < 0.05,
               detail);

    /* A blob 6.5 pixels right of the center ends up at 45 degrees, up and right. */
    draw_blob(in, 13.5, 20);
    rotate_image(out, in, SIDE, 45);
    image_mass(out, &row_out, &col_out);
    snprintf(detail, sizeof detail, "center (13.50, 20.00) -> (%.2f, %.2f), expected (%.2f, %.2f)", row_out,
             col_out, 13.5 - 6.5 * sqrt(0.5), 13.5 + 6.5 * sqrt(0.5));
    check_true("rotation by 45 degrees is counterclockwise",
               fabs(row_out - (13.5 - 6.5 * sqrt(0.5))) < 0.2 && fabs(col_out - (13.5 + 6.5 * sqrt(0.5))) < 0.2,
               detail);
}

static void test_rotated_mnist(void)
{
    dataset train, test;
    rotated_mnist r;
    int *seen, sizes[DOMAIN_COUNT] = {0}, j, repeats = 0, wrong_domain = 0, wrong_label = 0, wrong_pixels = 0;
    unsigned char expected[SIDE * SIDE];
    char detail[300];

    if (!load_split(&train, "data", "mnist", "train", SIDE) || !load_split(&test, "data", "mnist", "test", SIDE) ||
        !build_rotated_mnist(&train, &test, &r)) {
        check_true("Rotated MNIST builds", 0, "see the message above");
        return;
    }
    seen = (int *)calloc((size_t)r.images.count, sizeof(int));
    for (j = 0; j < r.images.count; j++) {
        const int k = r.source[j];
        const dataset *from = k < train.count ? &train : &test;
        const int index = k < train.count ? k : k - train.count;
        repeats += seen[k]++ > 0;
        sizes[r.domain[j]]++;
        wrong_domain += r.domain[j] != j % DOMAIN_COUNT;
        wrong_label += r.images.labels[j] != from->labels[index];
        rotate_image(expected, from->pixels + (size_t)index * SIDE * SIDE, SIDE, domain_angles[r.domain[j]]);
        wrong_pixels += memcmp(expected, r.images.pixels + (size_t)j * SIDE * SIDE, sizeof expected) != 0;
    }
    snprintf(detail, sizeof detail, "%d images, %d sources repeated; shares %d %d %d %d %d %d", r.images.count,
             repeats, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]);
    check_true("Rotated MNIST uses every digit once", r.images.count == 10000 && repeats == 0, detail);
    for (j = 0; j < DOMAIN_COUNT; j++)
        wrong_domain += sizes[j] != (j < 4 ? 1667 : 1666);
    check_true("Rotated MNIST share sizes", wrong_domain == 0, detail);
    snprintf(detail, sizeof detail, "%d wrong labels, %d images differ from their rotated source", wrong_label,
             wrong_pixels);
    check_true("Rotated MNIST images match sources", wrong_label == 0 && wrong_pixels == 0, detail);

    free(seen);
    free_rotated_mnist(&r);
    free_dataset(&train);
    free_dataset(&test);
}

/* Checks one leave-one-domain-out split: every image in exactly one list,
   the test list is the held-out domain, and val has about 20% of each
   other domain. Returns a description of the first problem, or NULL. */
static const char *check_domain_split(const rotated_mnist *r, int test_domain, long seed)
{
    const int n = r->images.count;
    int *train = (int *)malloc((size_t)n * sizeof(int)), *val = (int *)malloc((size_t)n * sizeof(int));
    int *test = (int *)malloc((size_t)n * sizeof(int)), *where = (int *)calloc((size_t)n, sizeof(int));
    int val_per_domain[DOMAIN_COUNT] = {0}, size_per_domain[DOMAIN_COUNT] = {0};
    int train_count, val_count, test_count, i;
    const char *problem = NULL;

    if (!split_domains(r, test_domain, seed, train, &train_count, val, &val_count, test, &test_count))
        problem = "split_domains failed";
    for (i = 0; !problem && i < train_count; i++)
        where[train[i]] += 1;
    for (i = 0; !problem && i < val_count; i++) {
        where[val[i]] += 2;
        val_per_domain[r->domain[val[i]]]++;
    }
    for (i = 0; !problem && i < test_count; i++) {
        where[test[i]] += 4;
        if (r->domain[test[i]] != test_domain)
            problem = "a test image is not from the held-out domain";
    }
    for (i = 0; !problem && i < n; i++) {
        size_per_domain[r->domain[i]]++;
        if (where[i] != 1 && where[i] != 2 && where[i] != 4)
            problem = "an image is in no list or in two lists";
        else if ((where[i] == 4) != (r->domain[i] == test_domain))
            problem = "a held-out image is trained or validated on";
    }
    for (i = 0; !problem && i < DOMAIN_COUNT; i++)
        if (i != test_domain && fabs(val_per_domain[i] - 0.2 * size_per_domain[i]) > DATA_CLASSES)
            problem = "a training domain does not hold out 20% for validation";
    free(train);
    free(val);
    free(test);
    free(where);
    return problem;
}

static void test_domain_splits(void)
{
    dataset train, test;
    rotated_mnist r;
    const char *problem = NULL;
    char detail[200] = "6 held-out domains x seeds 0, 1: train, val and test partition all 10,000 images";
    int domain;
    long seed;

    if (!load_split(&train, "data", "mnist", "train", SIDE) || !load_split(&test, "data", "mnist", "test", SIDE) ||
        !build_rotated_mnist(&train, &test, &r)) {
        check_true("domain split builds", 0, "see the message above");
        return;
    }
    for (domain = 0; domain < DOMAIN_COUNT && !problem; domain++)
        for (seed = 0; seed < 2 && !problem; seed++)
            if ((problem = check_domain_split(&r, domain, seed)) != NULL)
                snprintf(detail, sizeof detail, "held-out domain %d, seed %ld: %s", domain, seed, problem);
    check_true("domain split disjoint and complete", problem == NULL, detail);
    free_rotated_mnist(&r);
    free_dataset(&train);
    free_dataset(&test);
}

/* A data set whose image i stores i in its first two pixels, so splits can
   be checked by index; classes of unequal size. */
static void make_indexed_dataset(dataset *d, int count)
{
    int i;
    d->count = count;
    d->rows = d->cols = SIDE;
    d->pixels = (unsigned char *)calloc((size_t)count, SIDE * SIDE);
    d->labels = (unsigned char *)malloc((size_t)count);
    for (i = 0; i < count; i++) {
        d->pixels[(size_t)i * SIDE * SIDE] = (unsigned char)(i & 255);
        d->pixels[(size_t)i * SIDE * SIDE + 1] = (unsigned char)(i >> 8);
        d->labels[i] = (unsigned char)((i * i + i / 7) % DATA_CLASSES);
    }
}

static int image_index(const dataset *d, int k)
{
    return d->pixels[(size_t)k * SIDE * SIDE] | d->pixels[(size_t)k * SIDE * SIDE + 1] << 8;
}

static void test_validation_split(void)
{
    static const double ratios[4] = {0.15, 0.30, 0.50, 1.00};
    dataset full, pool, val, again_pool, again_val, train;
    unsigned char in_val[3000] = {0};
    int i, k, overlaps = 0, repeats = 0, ratio_one_missing = 0, same;
    long seed;
    char detail[200];

    make_indexed_dataset(&full, 3000);
    split_validation(&full, &pool, &val);
    split_validation(&full, &again_pool, &again_val);
    same = val.count == again_val.count && memcmp(val.pixels, again_val.pixels, (size_t)val.count * SIDE * SIDE) == 0;
    check_true("validation split fixed", same, "two calls give the same validation images in the same order");
    snprintf(detail, sizeof detail, "%d validation + %d pool of %d images", val.count, pool.count, full.count);
    check_true("validation split takes 10 percent", val.count + pool.count == full.count && abs(val.count - 300) <= 5,
               detail);
    for (k = 0; k < val.count; k++)
        in_val[image_index(&val, k)] = 1;

    for (seed = 0; seed < 3; seed++)
        for (i = 0; i < 4; i++) {
            unsigned char in_train[3000] = {0};
            make_subset(&pool, ratios[i], (uint64_t)seed, &train);
            for (k = 0; k < train.count; k++) {
                const int index = image_index(&train, k);
                overlaps += in_val[index];
                repeats += in_train[index]++;
            }
            if (ratios[i] == 1.0)
                ratio_one_missing += pool.count - train.count;
            free_dataset(&train);
        }
    snprintf(detail, sizeof detail, "seeds 0-2 x ratios 0.15-1: %d training images in validation, %d repeated, "
             "%d pool images missing at ratio 1", overlaps, repeats, ratio_one_missing);
    check_true("validation split disjoint from subsets", overlaps == 0 && repeats == 0, detail);
    check_true("subset at ratio 1 is whole pool", ratio_one_missing == 0, detail);

    free_dataset(&full);
    free_dataset(&pool);
    free_dataset(&val);
    free_dataset(&again_pool);
    free_dataset(&again_val);
}

static run_record hand_record(const char *method, double p, double ratio, long seed, double val, double test)
{
    run_record r;
    memset(&r, 0, sizeof r);
    r.method = method;
    r.p = p;
    r.ratio = ratio;
    r.domain = NO_DOMAIN;
    r.seed = seed;
    r.val_acc = val;
    r.test_acc = test;
    return r;
}

static void test_summaries(void)
{
    const double x[3] = {1, 2, 4};
    double mean, std;
    run_record records[6];
    summary_cell cells[6];
    run_table table;
    char detail[200];
    int count;

    memset(cells, 0, sizeof cells);
    mean_std(x, 3, &mean, &std);
    snprintf(detail, sizeof detail, "{1, 2, 4}: mean %.6f (7/3), std %.6f (sqrt(7/3) = 1.527525)", mean, std);
    check_true("mean of three values by hand", fabs(mean - 7.0 / 3.0) < 1e-12, detail);
    check_true("sample std of three values by hand", fabs(std - sqrt(7.0 / 3.0)) < 1e-12, detail);
    mean_std(x, 1, &mean, &std);
    check_true("sample std of one value is NaN", mean == 1 && isnan(std), "n = 1: mean 1, std NaN");

    records[0] = hand_record("ft", 0, 0.15, 0, 80, 90);
    records[1] = hand_record("stochca", 0.1, 0.15, 0, 81, 91);
    records[2] = hand_record("ft", 0, 0.15, 1, 82, 92);
    records[3] = hand_record("ft", 0, 0.30, 0, 70, 70);
    records[4] = hand_record("ft", 0, 0.15, 2, 84, 94);
    records[5] = hand_record("stochca", 0.3, 0.15, 0, 85, 85);
    table.runs = records;
    table.count = table.capacity = 6;
    count = summarize_runs(&table, cells);
    snprintf(detail, sizeof detail, "%d cells; ft 0.15: n %d, test mean %.3f, std %.3f, val mean %.3f", count,
             cells[0].n, cells[0].test_mean, cells[0].test_std, cells[0].val_mean);
    check_true("summary groups runs by cell", count == 4 && cells[0].n == 3 && cells[1].n == 1 && cells[2].n == 1 &&
                                               cells[2].ratio == 0.30 && cells[3].p == 0.3, detail);
    check_true("summary mean and std by hand", fabs(cells[0].test_mean - 92) < 1e-12 &&
                                               fabs(cells[0].test_std - 2) < 1e-12 &&
                                               fabs(cells[0].val_mean - 82) < 1e-12, detail);
}

static void test_choose_p(void)
{
    summary_cell cells[3];
    memset(cells, 0, sizeof cells);
    cells[0].p = 0.1;
    cells[0].val_mean = 90;
    cells[0].test_mean = 99;   /* best test accuracy */
    cells[1].p = 0.3;
    cells[1].val_mean = 95;    /* best validation accuracy */
    cells[1].test_mean = 80;
    cells[2].p = 0.5;
    cells[2].val_mean = 95;    /* ties with 0.3 */
    cells[2].test_mean = 70;
    check_true("p choice ignores test accuracy", choose_p(cells, 3) == 0.3,
               "validation 90, 95, 95 and test 99, 80, 70 for p 0.1, 0.3, 0.5 give p 0.3");
}

static void test_output_folder(void)
{
    struct stat info;
    const int created = make_folder("test_sweep.tmp.d/a/b");
    check_true("output folder created with parents", created && stat("test_sweep.tmp.d/a/b", &info) == 0 &&
                                                     S_ISDIR(info.st_mode), "test_sweep.tmp.d/a/b");
    check_true("existing output folder accepted", make_folder("test_sweep.tmp.d/a/b"), "second call succeeds");
    remove("test_sweep.tmp.d/a/b");
    remove("test_sweep.tmp.d/a");
    remove("test_sweep.tmp.d");
}

/* ---------------------------------------------------------------------------
   Allocation failures: each one is returned as STOCHCA_ERR_NOMEM, and
   nothing stays allocated after stochca_model_free. */

static int allocation_sequence(stochca_error *err)
{
    stochca_config c = tiny_config();
    stochca_model a, b;
    int status;
    memset(&b, 0, sizeof b);
    status = stochca_model_init(&a, &c, err);
    if (status == STOCHCA_OK)
        status = stochca_model_reserve(&a, 2, 1, err);
    if (status == STOCHCA_OK)
        status = stochca_model_init_transfer(&b, &a, 5, err);
    if (status == STOCHCA_OK)
        status = stochca_checkpoint_save(&a, NULL, TMP_CHECKPOINT, 1, err);
    if (status == STOCHCA_OK)
        status = stochca_checkpoint_load(&a, NULL, TMP_CHECKPOINT, err);
    if (status == STOCHCA_OK) {
        stochca_kv_cache cache;
        status = stochca_kv_cache_init(&cache, &c, 3, 2, 1e9, err);
        stochca_kv_cache_free(&cache);
    }
    stochca_model_free(&a);
    stochca_model_free(&b);
    return status;
}

static void test_allocation_failures(void)
{
    stochca_error err;
    long k, injected = 0, wrong_status = 0, leaks = 0;
    char detail[400] = "";
    for (k = 1; k < 100; k++) {
        int status;
        allocations_live = 0;
        allocation_failed = 0;
        allocations_until_failure = k;
        status = allocation_sequence(&err);
        allocations_until_failure = 0;
        if (!allocation_failed)
            break;
        injected++;
        if (status != STOCHCA_ERR_NOMEM || !strstr(err.message, "out of memory")) {
            wrong_status++;
            snprintf(detail, sizeof detail, "allocation %ld: status %d, message: %s", k, status, err.message);
        }
        leaks += allocations_live != 0;
    }
    remove(TMP_CHECKPOINT);
    if (!detail[0])
        snprintf(detail, sizeof detail, "%ld allocations failed in turn, %ld leaked", injected, leaks);
    check_true("allocation failure returns NOMEM", injected >= 8 && wrong_status == 0, detail);
    check_true("allocation failure leaks nothing", injected >= 8 && leaks == 0, detail);
}

/* ---------------------------------------------------------------------------
   The driver end to end: ./train on the shipped data. These tests need the
   train binary (make test builds it) and data/pretrained.bin. */

#define FT_FLAGS "finetune --method stochca --p 0.5 --ratio 0.02 --batch 8 --steps 6 --warmup 2"

/* Runs a shell command with stderr and stdout captured to OUTPUT_FILE.
   Returns the exit status, or -1 if it could not run. */
static const char *const OUTPUT_FILE = "test_output.tmp.txt";

static int run(const char *command)
{
    char line[2048];
    int status;
    snprintf(line, sizeof line, "%s > %s 2>&1", command, OUTPUT_FILE);
    status = system(line);
    if (status == -1)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Checks the exit status and that the output contains `text`. */
static void check_command(const char *name, const char *command, int expected_status, const char *text)
{
    int status = run(command);
    size_t size = 0;
    char *output = (char *)read_bytes(OUTPUT_FILE, &size);
    char detail[700], *last_line;
    output = (char *)realloc(output, size + 1);
    output[size] = '\0';
    last_line = strstr(output, text) ? strstr(output, text) : output;
    snprintf(detail, sizeof detail, "exit %d (expected %d): %.300s", status, expected_status, last_line);
    for (last_line = detail; *last_line; last_line++)
        if (*last_line == '\n' || *last_line == '\r')
            *last_line = ' ';
    check_true(name, status == expected_status && strstr(output, text) != NULL, detail);
    free(output);
}

static int same_file(const char *a, const char *b)
{
    size_t size_a, size_b;
    unsigned char *x = read_bytes(a, &size_a), *y = read_bytes(b, &size_b);
    int same = size_a == size_b && memcmp(x, y, size_a) == 0;
    free(x);
    free(y);
    return same;
}

static void test_driver_flags(void)
{
    check_command("flag p above 1 rejected", "./train finetune --p 1.5", 2,
                  "train: invalid value '1.5' for --p, expected a number in [0, 1]");
    check_command("flag ratio 0 rejected", "./train finetune --ratio 0", 2,
                  "train: invalid value '0' for --ratio, expected a number in (0, 1]");
    check_command("flag batch 0 rejected", "./train finetune --batch 0", 2,
                  "train: invalid value '0' for --batch, expected an integer from 1 to 65536");
    check_command("flag steps not a number rejected", "./train finetune --steps ten", 2,
                  "train: invalid value 'ten' for --steps, expected an integer from 1 to 100000000");
    check_command("flag unknown method rejected", "./train finetune --method sgd", 2,
                  "train: invalid value 'sgd' for --method, expected ft, stochca, l2sp or stochca+l2sp");
    check_command("flag unknown prints usage", "./train finetune --bogus 1", 2, "usage: ./train");
    check_command("flag missing value rejected", "./train finetune --lr", 2, "train: missing value for --lr");
    check_command("unknown command rejected", "./train fly", 2, "train: unknown command 'fly'");
    check_command("missing data folder rejected", "./train " FT_FLAGS " --data no/such/dir", 1,
                  "train: cannot open 'no/such/dir/mnist-train-images.idx'");
    check_command("missing checkpoint rejected", "./train " FT_FLAGS " --checkpoint no/such.bin", 1,
                  "train: cannot open checkpoint 'no/such.bin'; check the path");
}

static void test_driver_sweep_flags(void)
{
    check_command("tl-sweep rejects --method", "./train tl-sweep --method ft", 2,
                  "train: invalid flag '--method' for tl-sweep, expected one of: --seeds");
    check_command("tl-sweep rejects --eval-every", "./train tl-sweep --eval-every 10", 2,
                  "train: invalid flag '--eval-every' for tl-sweep");
    check_command("dg-sweep rejects --ratio", "./train dg-sweep --ratio 0.5", 2,
                  "train: invalid flag '--ratio' for dg-sweep");
    check_command("finetune rejects --seeds", "./train finetune --seeds 2", 2,
                  "train: invalid flag '--seeds' for finetune, expected one of: --method");
    check_command("main job rejects --ratio", "./train --ratio 0.5", 2,
                  "train: invalid flag '--ratio' for the main job");
    check_command("bench rejects --method", "./train bench --method ft", 2,
                  "train: invalid flag '--method' for bench");
    check_command("pretrain rejects --ratio", "./train pretrain --ratio 0.5", 2,
                  "train: invalid flag '--ratio' for pretrain");
    check_command("stray argument rejected", "./train finetune --steps 2 extra", 2,
                  "train: unexpected argument 'extra', expected a flag such as --steps");
    check_command("flag with equals sign rejected", "./train finetune --steps=2", 2,
                  "train: invalid flag '--steps=2': give the value after a space");
    check_command("stop-after needs save-every", "./train finetune --stop-after 3", 2,
                  "train: --stop-after needs --save-every");
    check_command("out in missing folder rejected early", "./train finetune --out no/such/dir/m.bin", 2,
                  "train: cannot create 'no/such/dir/m.bin.tmp' for --out");
    check_command("out that is a folder rejected", "./train finetune --out data", 2,
                  "train: --out 'data' is a folder");
    check_command("flag seeds 0 rejected", "./train tl-sweep --seeds 0", 2,
                  "train: invalid value '0' for --seeds, expected an integer from 1 to 1000");
    check_command("flag eval-every 0 rejected", "./train dg-sweep --eval-every 0", 2,
                  "train: invalid value '0' for --eval-every, expected an integer from 1 to 100000000");
    check_command("out-dir that is a file rejected", "./train tl-sweep --out-dir README.md", 1,
                  "train: --out-dir 'README.md' exists but is not a folder");
    check_command("tl-sweep missing data rejected", "./train tl-sweep --data no/such/dir --out-dir test_sweep.tmp.d", 1,
                  "train: cannot open 'no/such/dir/mnist-train-images.idx'");
    check_command("dg-sweep missing checkpoint rejected",
                  "./train dg-sweep --checkpoint no/such.bin --out-dir test_sweep.tmp.d", 1,
                  "train: cannot open checkpoint 'no/such.bin'; check the path");
    remove("test_sweep.tmp.d");
}

/* A valid checkpoint for 32x32x3 images must not be used on MNIST. */
static void test_driver_other_shape(stochca_rng *rng)
{
    stochca_config c = tiny_config();
    stochca_model m;
    stochca_error err;
    c.image_size = 32;
    c.channels = 3;
    if (stochca_model_init(&m, &c, &err) != STOCHCA_OK)
        exit(2);
    fill_random(m.param_memory, m.num_params, -0.5, 0.5, rng);
    stochca_checkpoint_save(&m, NULL, TMP_CHECKPOINT, 0, &err);
    check_command("checkpoint of other image shape rejected", "./train " FT_FLAGS " --checkpoint " "test_checkpoint.tmp.bin", 1,
                  "is for 32x32x3 images, but the data is 28x28x1");
    remove(TMP_CHECKPOINT);
    stochca_model_free(&m);
}

static void test_driver_resume(void)
{
    check_command("train straight 6 steps", "./train " FT_FLAGS " --save-every 3 --out test_a.tmp.bin", 0,
                  "MNIST test accuracy");
    check_command("train 3 steps then stop", "./train " FT_FLAGS " --save-every 3 --stop-after 3 --out test_b.tmp.bin",
                  0, "stopped after step 3");
    check_command("resume for 3 more steps", "./train " FT_FLAGS " --save-every 3 --resume test_b.tmp.bin --out test_b.tmp.bin",
                  0, "resuming from 'test_b.tmp.bin' at step 3");
    check_true("resume gives bit-identical parameters", same_file("test_a.tmp.bin", "test_b.tmp.bin"),
               "6 straight steps and 3 + 3 resumed steps give the same checkpoint file");
    check_command("resume from a file without state rejected",
                  "./train " FT_FLAGS " --resume data/pretrained.bin --out test_c.tmp.bin", 1,
                  "contains no training state; --resume needs a file written with --save-every");
    check_command("resume past the last step rejected",
                  "./train finetune --method stochca --p 0.5 --ratio 0.02 --batch 8 --steps 2 --warmup 2 "
                  "--resume test_b.tmp.bin --out test_c.tmp.bin", 1,
                  "train: 'test_b.tmp.bin' is at step 6, but this run has only 2 steps");
    remove("test_a.tmp.bin");
    remove("test_b.tmp.bin");
}

static void test_driver_threads(void)
{
    check_command("train with 1 thread", "./train " FT_FLAGS " --threads 1 --out test_t1.tmp.bin", 0, "MNIST test accuracy");
    check_command("train with 2 threads", "./train " FT_FLAGS " --threads 2 --out test_t2.tmp.bin", 0, "MNIST test accuracy");
    check_true("1 and 2 threads give identical parameters", same_file("test_t1.tmp.bin", "test_t2.tmp.bin"),
               "checkpoints after 6 StochCA steps are equal byte for byte");
    check_command("train without K/V cache", "./train " FT_FLAGS " --kv-cache-mb 0 --out test_t2.tmp.bin", 0,
                  "MNIST test accuracy");
    check_true("K/V cache gives identical parameters", same_file("test_t1.tmp.bin", "test_t2.tmp.bin"),
               "cached and recomputed pretrained K/V give the same checkpoint");
    remove("test_t1.tmp.bin");
    remove("test_t2.tmp.bin");
}

/* A pretrained model whose patch projection overflows float makes the
   loss NaN at step 1; training stops and a good file at --out survives. */
static void test_driver_nan(void)
{
    size_t size, i;
    unsigned char *bytes = read_bytes("data/pretrained.bin", &size);
    const unsigned char huge[4] = {0xe6, 0xb1, 0x61, 0x7f};  /* 3e38f, little-endian: sums overflow to inf */
    const size_t conv_proj = 64 + 4 * 64;                     /* after the header and class_token (D 64) */
    for (i = 0; i < 64 * 49; i++)
        memcpy(bytes + conv_proj + 4 * i, huge, 4);
    write_bytes("test_overflow.tmp.bin", bytes, size);
    free(bytes);
    run("./train " FT_FLAGS " --save-every 3 --stop-after 3 --out test_good.tmp.bin");
    bytes = read_bytes("test_good.tmp.bin", &size);
    check_command("NaN loss stops training", "./train " FT_FLAGS " --checkpoint test_overflow.tmp.bin --save-every 1 --out test_good.tmp.bin",
                  1, "train: step 1: the loss is not finite");
    {
        size_t after_size;
        unsigned char *after = read_bytes("test_good.tmp.bin", &after_size);
        check_true("NaN loss keeps the last good file", after_size == size && memcmp(after, bytes, size) == 0,
                   "the file at --out is unchanged");
        free(after);
    }
    free(bytes);
    remove("test_overflow.tmp.bin");
    remove("test_good.tmp.bin");
}

/* ---------------------------------------------------------------------------
   torchvision reference: a ViT built by torchvision 0.14 and run by PyTorch
   1.13 in float64 (data/torchvision/README.md). */

#define TV_DIR "data/torchvision/"

/* Reads n numbers, one per line, from a text file. */
static int read_numbers(const char *path, double *x, size_t n)
{
    FILE *f = fopen(path, "r");
    size_t i;
    if (!f)
        return 0;
    for (i = 0; i < n; i++)
        if (fscanf(f, "%lf", &x[i]) != 1)
            break;
    fclose(f);
    return i == n;
}

/* Checks values against a reference with |a - r| <= 1e-9 (1 + |r|). */
static void check_reference(const char *name, const double *actual, const double *reference, size_t n)
{
    double worst = 0;
    size_t i;
    char detail[128];
    for (i = 0; i < n; i++)
        worst = fmax(worst, fabs(actual[i] - reference[i]) / (1 + fabs(reference[i])));
    snprintf(detail, sizeof detail, "max relative error %.2e over %zu values", worst, n);
    check_true(name, worst <= 1e-9, detail);
}

static void load_reference_model(stochca_model *m, const char *path)
{
    stochca_config c;
    stochca_error err;
    if (stochca_checkpoint_read_config(path, &c, &err) != STOCHCA_OK || stochca_model_init(m, &c, &err) != STOCHCA_OK ||
        stochca_checkpoint_load(m, NULL, path, &err) != STOCHCA_OK || stochca_model_reserve(m, 3, 1, &err) != STOCHCA_OK) {
        fprintf(stderr, "test: %s\n", err.message);
        exit(2);
    }
}

static void test_torchvision_reference(void)
{
    enum { N = 3, K = 10, PIXELS = N * 3 * 28 * 28 };
    static const char *const flags[2] = {"10", "11"};
    stochca_model m, pre;
    stochca_kv kv;
    stochca_error err;
    float raw[PIXELS];
    int32_t labels32[N];
    int labels[N], i;
    double *images = new_array(PIXELS), reference[N * K], loss, *grads;
    size_t size;
    unsigned char *bytes;

    load_reference_model(&m, TV_DIR "model.stca");
    load_reference_model(&pre, TV_DIR "pre.stca");
    bytes = read_bytes(TV_DIR "input.f32", &size);
    memcpy(raw, bytes, sizeof raw);   /* little-endian float32, as on the machines this runs on */
    free(bytes);
    bytes = read_bytes(TV_DIR "labels.i32", &size);
    memcpy(labels32, bytes, sizeof labels32);
    free(bytes);
    for (i = 0; i < PIXELS; i++)
        images[i] = raw[i];
    for (i = 0; i < N; i++)
        labels[i] = labels32[i];

    stochca_forward(&m, images, labels, N, NULL, NULL, &err);
    read_numbers(TV_DIR "logits.txt", reference, N * K);
    check_reference("torchvision reference: logits", m.acts.logits, reference, N * K);
    read_numbers(TV_DIR "loss.txt", &loss, 1);
    check_reference("torchvision reference: loss", &m.loss, &loss, 1);

    grads = new_array(m.num_params);
    stochca_zero_grad(&m);
    stochca_backward(&m, &err);
    check_true("torchvision reference: gradients read", read_numbers(TV_DIR "grads.txt", grads, m.num_params),
               TV_DIR "grads.txt");
    check_gradient("torchvision reference: autograd gradients", m.grad_memory, grads, m.num_params);

    stochca_pretrained_kv(&pre, images, N, &kv, &err);
    for (i = 0; i < 2; i++) {
        unsigned char cross[2];
        char path[96], name[96];
        cross[0] = (unsigned char)(flags[i][0] - '0');
        cross[1] = (unsigned char)(flags[i][1] - '0');
        stochca_forward(&m, images, labels, N, cross, &kv, &err);
        snprintf(path, sizeof path, TV_DIR "stochca_logits_%s.txt", flags[i]);
        snprintf(name, sizeof name, "torchvision reference: StochCA flags %s", flags[i]);
        read_numbers(path, reference, N * K);
        check_reference(name, m.acts.logits, reference, N * K);
    }
    free(images);
    free(grads);
    stochca_model_free(&m);
    stochca_model_free(&pre);
}

/* ---------------------------------------------------------------------------
   Speed-ups: cached pretrained keys and values, skipped target K and V */

static void test_kv_cache(stochca_rng *rng)
{
    stochca_model pretrained;
    stochca_kv_cache cache;
    stochca_kv cached, fresh;
    stochca_config c = tiny_config();
    const size_t image = 2 * 8 * 8;
    double images[4 * 2 * 8 * 8], batch[2 * 2 * 8 * 8];
    const int first[2] = {0, 1}, second[2] = {2, 3}, mixed[2] = {3, 0};
    stochca_error err;
    int l, b, t, same = 1;

    init_tiny_model(&pretrained, 0, rng);
    fill_random(images, 4 * image, -1, 1, rng);
    stochca_kv_cache_init(&cache, &c, 4, 2, 1e9, &err);
    stochca_kv_cache_lookup(&cache, &pretrained, images, first, 2, &cached, &err);
    stochca_kv_cache_lookup(&cache, &pretrained, images + 2 * image, second, 2, &cached, &err);

    /* Images 3 and 0 were stored from two other batches; now they are gathered. */
    memcpy(batch, images + 3 * image, image * sizeof(double));
    memcpy(batch + image, images, image * sizeof(double));
    stochca_kv_cache_lookup(&cache, &pretrained, batch, mixed, 2, &cached, &err);
    stochca_pretrained_kv(&pretrained, batch, 2, &fresh, &err);
    for (l = 0; l < c.depth; l++)
        for (b = 0; b < 2; b++)
            for (t = 0; t < 5; t++) {
                const double *ck = cached.key[l] + (size_t)(b * 5 + t) * cached.row_stride;
                const double *cv = cached.value[l] + (size_t)(b * 5 + t) * cached.row_stride;
                const double *fk = fresh.key[l] + (size_t)(b * 5 + t) * fresh.row_stride;
                const double *fv = fresh.value[l] + (size_t)(b * 5 + t) * fresh.row_stride;
                same &= same_bits(ck, fk, 8) && same_bits(cv, fv, 8);
            }
    check_true("K/V cache equals recomputed K0, V0", same && cached.row_stride == 16 && fresh.row_stride == 24,
               "gathered entries equal a fresh pretrained forward, bit for bit");
    stochca_kv_cache_free(&cache);

    check_true("K/V cache over budget rejected",
               stochca_kv_cache_init(&cache, &c, 1000, 2, 1000.0, &err) == STOCHCA_ERR_NOMEM &&
                   strstr(err.message, "more than the budget") != NULL && cache.memory == NULL,
               err.message);
    stochca_model_free(&pretrained);
}

/* A cross-attention block computes only Q. Recomputing the full in_proj
   and attending with its Q rows must give the same queries and output. */
static void test_skipped_kv(stochca_rng *rng)
{
    stochca_model target, pretrained;
    stochca_kv kv;
    stochca_config c = tiny_config();
    const unsigned char cross[3] = {0, 1, 0};
    const size_t rows = MB * 5;
    double images[MB * 2 * 8 * 8], *qkv = new_array(rows * 24), *attn = new_array(rows * 8);
    double *probs = new_array(MB * 2 * 5 * 5), *scratch = new_array(rows * 24);
    int labels[MB] = {0, 1}, r, same_q = 1;
    stochca_error err;

    init_tiny_model(&target, 1, rng);
    init_tiny_model(&pretrained, 0, rng);
    fill_random(images, MB * 2 * 8 * 8, -1, 1, rng);
    stochca_pretrained_kv(&pretrained, images, MB, &kv, &err);
    stochca_forward(&target, images, labels, MB, cross, &kv, &err);

    stochca_linear_forward(qkv, target.acts.block[1].ln1, target.params.block[1].qkv_w, target.params.block[1].qkv_b,
                           scratch, (int)rows, 8, 24);
    for (r = 0; r < (int)rows; r++)
        same_q &= same_bits(qkv + (size_t)r * 24, target.acts.block[1].qkv + (size_t)r * 8, 8);
    stochca_attention_forward(attn, probs, scratch, qkv, 24, kv.key[1], kv.value[1], kv.row_stride, MB, 5, 8, 2);
    check_true("skipped K, V leave queries unchanged", same_q, "Q rows equal those of the full in_proj");
    check_true("skipped K, V leave attention unchanged", same_bits(attn, target.acts.block[1].attn, rows * 8),
               "attention output equals the one computed from the full in_proj");
    (void)c;
    free(qkv); free(attn); free(probs); free(scratch);
    stochca_model_free(&target);
    stochca_model_free(&pretrained);
}

/* ---------------------------------------------------------------------------
   Fuzzing entry points for libFuzzer, built by .ci/run with
   clang -fsanitize=fuzzer,address,undefined -DSTOCHCA_FUZZ=1 (IDX reader)
   or -DSTOCHCA_FUZZ=2 (checkpoint reader). */
#ifdef STOCHCA_FUZZ
#include <unistd.h>

#if STOCHCA_FUZZ == 1
/* Input: a 2-byte big-endian length n, then an image file of n bytes, then a label file. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    dataset d;
    char msg[1024];
    size_t split;
    if (size < 2)
        return 0;
    split = ((size_t)data[0] << 8 | data[1]) % (size - 1);
    if (parse_dataset(&d, data + 2, (long)split, "images", data + 2 + split, (long)(size - 2 - split), "labels", 28,
                      msg, sizeof msg))
        free_dataset(&d);
    return 0;
}
#else
/* Input: a checkpoint file. Models of more than 4 million parameters are skipped. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    stochca_config c;
    stochca_model m;
    stochca_rng rng;
    stochca_error err;
    snprintf(path, sizeof path, "fuzz_checkpoint_%ld.tmp", (long)getpid());
    write_bytes(path, data, size);
    if (stochca_checkpoint_read_config(path, &c, &err) == STOCHCA_OK &&
        stochca__layout_params(&c, NULL, NULL) <= 4000000 && stochca_model_init(&m, &c, &err) == STOCHCA_OK) {
        stochca_model_reserve(&m, 1, 1, &err);
        stochca_checkpoint_load(&m, &rng, path, &err);
        stochca_model_free(&m);
    }
    remove(path);
    return 0;
}
#endif
#else

int main(void)
{
    stochca_rng rng;
    stochca_rng_seed(&rng, 42);
#ifdef _OPENMP
    /* The tiny kernels here run faster on one thread; the driver tests
       compare 1 and 2 threads separately. */
    omp_set_num_threads(1);
#endif

    test_linear(&rng);
    test_embed(&rng);
    test_layernorm(&rng);
    test_attention(&rng);
    test_attention_large_scores();
    test_gelu(&rng);
    test_float_exp_erf();
    test_residual(&rng);
    test_crossentropy(&rng);
    test_model_gradients(&rng);
    test_stochca_properties(&rng);
    test_bernoulli_draws();
    test_adamw(&rng);
    test_matmul_tiles(&rng);
    test_adamw_two_steps(&rng);
    test_schedule();
    test_l2sp(&rng);
    test_tensor_table();
    test_config_validation();
    test_checkpoints(&rng);
    test_idx();
    test_torchvision_reference();
    test_kv_cache(&rng);
    test_skipped_kv(&rng);
    test_rotation(&rng);
    test_rotated_mnist();
    test_domain_splits();
    test_validation_split();
    test_summaries();
    test_choose_p();
    test_output_folder();
    test_allocation_failures();
    test_driver_flags();
    test_driver_sweep_flags();
    test_driver_other_shape(&rng);
    test_driver_resume();
    test_driver_threads();
    test_driver_nan();
    remove(OUTPUT_FILE);

    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
#endif /* STOCHCA_FUZZ */
