/* stochca.h - StochCA fine-tuning of Vision Transformers in one C header.
   Version 0.1.0. The license is at the end of this file.

   StochCA ("stochastic cross-attention", Seo, Lee and Hwang, arXiv 2402.16092)
   fine-tunes a pretrained Vision Transformer. In every training step, each
   block of the trained (target) model flips a coin with probability p. On
   heads, the block's queries attend to the keys and values that the same
   block of the frozen pretrained model computes for the same images. On
   tails, the block runs ordinary self-attention. Evaluation always uses
   self-attention. PAPER_NOTES.md maps every equation to a function here.

   This file is a reference: scalar C99, readable loops, OpenMP pragmas on
   race-free outer loops, and exact gradients for every operation. It does
   not do dropout, stochastic depth, mixed precision, or data loading.

   USAGE

     Include this header where you need the declarations. In exactly one C
     or C++ file, define STOCHCA_IMPLEMENTATION before including it:

       #define STOCHCA_IMPLEMENTATION
       #include "stochca.h"

     Override macros, defined before the implementation is included:
       STOCHCA_DOUBLE     compute in double instead of float (the gradient
                          checks use it). Checkpoints stay float32.
       STOCHCA_STATIC     make every function static to this file.
       STOCHCA_MALLOC(n) and STOCHCA_FREE(p)
                          replace malloc and free. Define both or neither.

     The float build computes exp and erf with its own functions, which
     compilers vectorize, within 0.6 units in the last place of the exact
     values. Under -ffast-math it uses libm's expf and erff instead.

   EXAMPLE: one StochCA training step and an evaluation (error checks
   shortened; every function that returns int returns 0 on success)

     static stochca_model pre, target;          zero-initialized
     stochca_config config;
     stochca_error err;
     stochca_rng rng;
     stochca_kv kv;
     stochca_adamw opt = stochca_adamw_default();
     unsigned char cross[STOCHCA_MAX_DEPTH];

     if (stochca_checkpoint_read_config("pretrained.bin", &config, &err) ||
         stochca_model_init(&pre, &config, &err) ||
         stochca_checkpoint_load(&pre, NULL, "pretrained.bin", &err) ||
         stochca_model_init_transfer(&target, &pre, 10, &err) ||
         stochca_model_reserve(&pre, B, 0, &err) ||
         stochca_model_reserve(&target, B, 1, &err))
         fail(err.message);
     stochca_rng_seed(&rng, 1);

     stochca_draw_cross(&rng, 0.1f, config.depth, cross);   beta_l ~ Bernoulli(0.1)
     stochca_pretrained_kv(&pre, images, B, &kv, &err);      K0, V0 of every block
     stochca_forward(&target, images, labels, B, cross, &kv, &err);
     stochca_zero_grad(&target);
     stochca_backward(&target, &err);
     stochca_adamw_update(&target, &opt);

     stochca_forward(&target, images, NULL, B, NULL, NULL, &err);  evaluation
     ... target.acts.logits holds (B,K) logits ...
     stochca_model_free(&pre);
     stochca_model_free(&target);

   SHAPE LETTERS

     B images in a batch        C image channels       S image side (pixels)
     P patch side (pixels)      N = (S/P)^2 patches    T = N + 1 tokens
     D channels (model width)   H attention heads      d = D / H per head
     M hidden units of the MLP  L blocks               K classes

   Tensors are row-major; (B,T,D) means index [b][t][c] at b*T*D + t*D + c.

   CONVENTIONS

     Every kernel comes as a _forward/_backward pair. Backward functions ADD
     into their gradient outputs, so callers zero them first
     (stochca_zero_grad does this for a model). A NULL gradient output
     means "not needed" and is skipped.

     Functions that can fail return a stochca_status (STOCHCA_OK is 0) and,
     if the caller passes a stochca_error, write a message into it that
     names the cause. Nothing here prints, exits, or keeps global state.
     Invalid arguments that only a programming error can cause (a NULL
     model, say) are not checked.

   THREAD SAFETY

     Different models may be used from different threads at once. One model
     must not be used by two threads at the same time. A pretrained model
     read by a target's forward must not be changed during that forward.
     With OpenMP, kernels split work over independent outputs only and sum
     in a fixed order, so results are bit-identical for any thread count.

   CHECKPOINT FORMAT (version 1, little-endian)

     A header of 16 uint32 words, then float32 arrays.
       word 0     magic 0x41435453 (the bytes "STCA")
       word 1     format version (1)
       words 2-9  image_size, channels, patch_size, dim, depth, heads,
                  mlp_dim, classes
       word 10    number of parameters, Q
       word 11    flags: bit 0 set when AdamW moments follow the parameters
       word 12    AdamW step count
       words 13-14 random generator state (low word, high word)
       word 15    zero
     Then Q float32 parameters, one tensor after another, in the order and
     shapes of the state dict of torchvision's VisionTransformer (see
     stochca_tensor_info). With flag bit 0, Q float32 first moments and Q
     float32 second moments follow. A reader in numpy:

       import numpy as np
       raw = open("model.bin", "rb").read()
       h = np.frombuffer(raw, "<u4", 16)
       assert h[0] == 0x41435453 and h[1] == 1
       S, C, P, D, L, H, M, K = h[2:10]
       theta = np.frombuffer(raw, "<f4", int(h[10]), 64)
       T = (S // P) ** 2 + 1
       class_token = theta[:D]
       conv_w = theta[D:D + D*C*P*P].reshape(D, C, P, P)

   LIMITATIONS

     Square images only. No dropout. The pretrained and target models must
     have the same configuration except for the number of classes. At most
     STOCHCA_MAX_DEPTH blocks.
*/
#ifndef STOCHCA_H
#define STOCHCA_H

#include <stddef.h>
#include <stdint.h>

#if defined(STOCHCA_STATIC) && (defined(__GNUC__) || defined(__clang__))
#define STOCHCA_API static __attribute__((unused)) /* no warning for functions a file does not call */
#elif defined(STOCHCA_STATIC)
#define STOCHCA_API static
#else
#define STOCHCA_API extern
#endif

#ifdef STOCHCA_DOUBLE
typedef double stochca_real;
#else
typedef float stochca_real;
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define STOCHCA_MAX_DEPTH 64
#define STOCHCA_CHECKPOINT_MAGIC 0x41435453u
#define STOCHCA_CHECKPOINT_VERSION 1u
#define STOCHCA_CHECKPOINT_HEADER_WORDS 16

typedef enum {
    STOCHCA_OK = 0,
    STOCHCA_ERR_CONFIG,     /* invalid or mismatched configuration */
    STOCHCA_ERR_ARGUMENT,   /* invalid argument value */
    STOCHCA_ERR_NOMEM,      /* an allocation failed */
    STOCHCA_ERR_IO,         /* a file could not be opened, read or written */
    STOCHCA_ERR_FORMAT,     /* a file is not a valid checkpoint */
    STOCHCA_ERR_STATE       /* call order violated, e.g. backward before forward */
} stochca_status;

/* Failure message filled in by functions that can fail. */
typedef struct {
    char message[256];
} stochca_error;

/* Model configuration. stochca_config_validate states the rules. */
typedef struct {
    int image_size;   /* S, pixels per side */
    int channels;     /* C */
    int patch_size;   /* P */
    int dim;          /* D */
    int depth;        /* L */
    int heads;        /* H */
    int mlp_dim;      /* M */
    int classes;      /* K */
} stochca_config;

/* Parameter views of one encoder block (also used for gradients). */
typedef struct {
    stochca_real *ln1_w;   /* (D)    ln_1.weight */
    stochca_real *ln1_b;   /* (D)    ln_1.bias */
    stochca_real *qkv_w;   /* (3D,D) self_attention.in_proj_weight, rows q, k, v */
    stochca_real *qkv_b;   /* (3D)   self_attention.in_proj_bias */
    stochca_real *proj_w;  /* (D,D)  self_attention.out_proj.weight */
    stochca_real *proj_b;  /* (D)    self_attention.out_proj.bias */
    stochca_real *ln2_w;   /* (D)    ln_2.weight */
    stochca_real *ln2_b;   /* (D)    ln_2.bias */
    stochca_real *fc1_w;   /* (M,D)  mlp.0.weight */
    stochca_real *fc1_b;   /* (M)    mlp.0.bias */
    stochca_real *fc2_w;   /* (D,M)  mlp.3.weight */
    stochca_real *fc2_b;   /* (D)    mlp.3.bias */
} stochca_block;

/* Parameter views of the whole model, in state-dict order. */
typedef struct {
    stochca_real *class_token;  /* (D)         class_token */
    stochca_real *patch_w;      /* (D,C,P,P)   conv_proj.weight */
    stochca_real *patch_b;      /* (D)         conv_proj.bias */
    stochca_real *pos_embed;    /* (T,D)       encoder.pos_embedding */
    stochca_block block[STOCHCA_MAX_DEPTH];
    stochca_real *lnf_w;        /* (D)         encoder.ln.weight */
    stochca_real *lnf_b;        /* (D)         encoder.ln.bias */
    stochca_real *head_w;       /* (K,D)       heads.head.weight */
    stochca_real *head_b;       /* (K)         heads.head.bias */
} stochca_params;

/* Name and shape of one parameter tensor. */
typedef struct {
    char name[64];   /* torchvision state-dict key */
    int ndim;
    int shape[4];
    size_t numel;
    size_t offset;   /* position in the flat parameter array */
} stochca_tensor_info;

/* Activations of one block for a batch (also used for their gradients). */
typedef struct {
    stochca_real *ln1;        /* (B,T,D) LN1 output u */
    stochca_real *ln1_mean;   /* (B,T) */
    stochca_real *ln1_rstd;   /* (B,T) reciprocal standard deviation */
    stochca_real *qkv;        /* (B,T,3D); (B,T,D) queries only in a cross-attention block */
    stochca_real *probs;      /* (B,H,T,T) attention probabilities */
    stochca_real *attn;       /* (B,T,D) heads concatenated */
    stochca_real *proj;       /* (B,T,D) attention output projection */
    stochca_real *resid;      /* (B,T,D) z + attention, the input of LN2 */
    stochca_real *ln2;        /* (B,T,D) */
    stochca_real *ln2_mean;   /* (B,T) */
    stochca_real *ln2_rstd;   /* (B,T) */
    stochca_real *fc1;        /* (B,T,M) MLP pre-activation */
    stochca_real *gelu;       /* (B,T,M) */
    stochca_real *fc2;        /* (B,T,D) */
    stochca_real *out;        /* (B,T,D) block output z_l */
} stochca_block_acts;

/* Activations of the whole model for a batch (also used for gradients). */
typedef struct {
    stochca_real *patches;    /* (B,N,C*P*P) unfolded image patches */
    stochca_real *patch_emb;  /* (B,N,D) projected patches */
    stochca_real *embed;      /* (B,T,D) z_0 */
    stochca_block_acts block[STOCHCA_MAX_DEPTH];
    stochca_real *lnf;        /* (B,D) final LayerNorm of the class token */
    stochca_real *lnf_mean;   /* (B) */
    stochca_real *lnf_rstd;   /* (B) */
    stochca_real *logits;     /* (B,K) */
    stochca_real *probs;      /* (B,K) softmax of the logits */
    stochca_real *losses;     /* (B) per-image cross-entropy */
} stochca_acts;

/* Keys and values of every block, as a cross-attention block reads them.
   key[l] and value[l] point at (B,T,D) rows spaced row_stride apart. */
typedef struct {
    const stochca_real *key[STOCHCA_MAX_DEPTH];
    const stochca_real *value[STOCHCA_MAX_DEPTH];
    int row_stride;
    int batch;
    int depth;
} stochca_kv;

/* Seeded random generator (SplitMix64); the only source of randomness. */
typedef struct {
    uint64_t state;
} stochca_rng;

/* A Vision Transformer with its buffers. stochca_model_init zeroes it first,
   and stochca_model_free is safe after a failed init. */
typedef struct {
    stochca_config config;
    size_t num_params;            /* Q */
    stochca_real *param_memory;   /* (Q) */
    stochca_params params;
    stochca_real *grad_memory;    /* (Q), allocated by stochca_model_reserve for training */
    stochca_params grads;
    stochca_real *adam_memory;    /* (2Q): first moments, then second moments */
    long adam_step;
    int batch_capacity;           /* largest B the activations fit */
    size_t num_acts;
    stochca_real *act_memory;
    stochca_acts acts;
    stochca_real *grad_act_memory;
    stochca_acts grad_acts;
    stochca_real *scratch;        /* a transposed weight, or transposed attention keys or values */
    /* State of the last forward, for backward. */
    int batch;
    int has_loss;
    int *labels;                  /* (B) copy of the last forward's labels */
    unsigned char cross[STOCHCA_MAX_DEPTH];
    stochca_kv cross_kv;          /* keys and values the cross-attention blocks used */
    stochca_real loss;
} stochca_model;

/* AdamW settings (decoupled weight decay, as torch.optim.AdamW). */
typedef struct {
    float lr;               /* learning rate of the backbone for this step */
    float head_lr_scale;    /* the head's learning rate is lr * head_lr_scale */
    float beta1, beta2;
    float eps;
    float weight_decay;
    int decay_head_only;    /* 1: no weight decay on the backbone (for L2-SP) */
} stochca_adamw;

/* ---------------------------------------------------------------------------
   Configuration, tensors, model life cycle */

/* Checks the configuration: positive sizes, image_size divisible by
   patch_size, dim divisible by heads, depth at most STOCHCA_MAX_DEPTH. */
STOCHCA_API int stochca_config_validate(const stochca_config *c, stochca_error *err);
STOCHCA_API int stochca_num_tokens(const stochca_config *c);          /* T */
STOCHCA_API int stochca_num_tensors(const stochca_config *c);         /* 4 + 12 L + 4 */
/* Fills the name, shape and offset of parameter tensor i (0-based). */
STOCHCA_API void stochca_tensor_info_at(const stochca_config *c, int i, stochca_tensor_info *info);
/* Allocates the parameters (all zero). No activations yet. */
STOCHCA_API int stochca_model_init(stochca_model *m, const stochca_config *c, stochca_error *err);
/* Allocates activations for batches of up to batch_capacity images and,
   when training is nonzero, gradients and AdamW moments. */
STOCHCA_API int stochca_model_reserve(stochca_model *m, int batch_capacity, int training, stochca_error *err);
STOCHCA_API void stochca_model_free(stochca_model *m);
/* Initializes parameters for training from scratch, close to torchvision's
   ViT: truncated-normal patch projection, Xavier-uniform in_proj and MLP
   weights, N(0, 0.02) position embedding, N(0, 1e-6) MLP biases, LayerNorm
   weights 1, and zero class token, other biases and head. */
STOCHCA_API void stochca_model_init_random(stochca_model *m, stochca_rng *rng);
/* Builds a target model from a pretrained one: copies every backbone
   tensor and creates a zero head with `classes` outputs. */
STOCHCA_API int stochca_model_init_transfer(stochca_model *target, const stochca_model *pretrained,
                                            int classes, stochca_error *err);

/* ---------------------------------------------------------------------------
   Kernels. Each pointer argument carries its shape. */

/* Cuts images (B,C,S,S) into patches (B,N,C*P*P), each flattened in
   (channel, row, column) order as conv_proj's weight expects. */
STOCHCA_API void stochca_patchify(stochca_real *patches, const stochca_real *images,
                                  int B, int C, int S, int P);
/* out (R,O) = inp (R,I) w^T (O,I) + b (O). bias may be NULL.
   scratch (I*O) receives w transposed. */
STOCHCA_API void stochca_linear_forward(stochca_real *out, const stochca_real *inp,
                                        const stochca_real *w, const stochca_real *bias,
                                        stochca_real *scratch, int R, int I, int O);
STOCHCA_API void stochca_linear_backward(stochca_real *dinp, stochca_real *dw, stochca_real *dbias,
                                         const stochca_real *dout, const stochca_real *inp,
                                         const stochca_real *w, int R, int I, int O);
/* z (B,T,D): row 0 = class_token (D), rows 1..N = patch_emb (B,N,D),
   plus pos_embed (T,D). */
STOCHCA_API void stochca_embed_forward(stochca_real *z, const stochca_real *patch_emb,
                                       const stochca_real *class_token, const stochca_real *pos_embed,
                                       int B, int T, int D);
STOCHCA_API void stochca_embed_backward(stochca_real *dpatch_emb, stochca_real *dclass_token,
                                        stochca_real *dpos_embed, const stochca_real *dz,
                                        int B, int T, int D);
/* LayerNorm over D for R rows; input row r starts at inp + r*inp_stride
   (inp_stride = D for dense rows, T*D to pick class tokens). out is (R,D). */
STOCHCA_API void stochca_layernorm_forward(stochca_real *out, stochca_real *mean, stochca_real *rstd,
                                           const stochca_real *inp, int inp_stride,
                                           const stochca_real *w, const stochca_real *b, int R, int D);
STOCHCA_API void stochca_layernorm_backward(stochca_real *dinp, stochca_real *dw, stochca_real *db,
                                            const stochca_real *dout, const stochca_real *inp,
                                            int inp_stride, const stochca_real *w,
                                            const stochca_real *mean, const stochca_real *rstd,
                                            int R, int D);
/* Multi-head attention. Query rows q (B,T,D) are q_stride apart; key and
   value rows (B,T,D) are kv_stride apart and may come from another model.
   out (B,T,D) concatenates the heads; probs (B,H,T,T) is kept for backward.
   scratch (B,T,D) is overwritten. */
STOCHCA_API void stochca_attention_forward(stochca_real *out, stochca_real *probs, stochca_real *scratch,
                                           const stochca_real *q, int q_stride,
                                           const stochca_real *k, const stochca_real *v, int kv_stride,
                                           int B, int T, int D, int H);
/* dprobs (B,H,T,T) and scratch (B,T,D) are overwritten. dk and dv may be
   NULL (frozen keys and values). */
STOCHCA_API void stochca_attention_backward(stochca_real *dq, stochca_real *dk, stochca_real *dv,
                                            stochca_real *dprobs, stochca_real *scratch,
                                            const stochca_real *dout,
                                            const stochca_real *probs,
                                            const stochca_real *q, int q_stride,
                                            const stochca_real *k, const stochca_real *v, int kv_stride,
                                            int B, int T, int D, int H);
/* Exact GELU, x * Phi(x) with the erf form of Phi, elementwise over n. */
STOCHCA_API void stochca_gelu_forward(stochca_real *out, const stochca_real *inp, size_t n);
STOCHCA_API void stochca_gelu_backward(stochca_real *dinp, const stochca_real *inp,
                                       const stochca_real *dout, size_t n);
/* out = a + b, elementwise over n. */
STOCHCA_API void stochca_residual_forward(stochca_real *out, const stochca_real *a,
                                          const stochca_real *b, size_t n);
STOCHCA_API void stochca_residual_backward(stochca_real *da, stochca_real *db,
                                           const stochca_real *dout, size_t n);
/* Softmax cross-entropy: probs (B,K) and losses (B) from logits (B,K) and
   labels (B) in [0,K). Returns the mean loss. */
STOCHCA_API stochca_real stochca_crossentropy_forward(stochca_real *losses, stochca_real *probs,
                                                      const stochca_real *logits, const int *labels,
                                                      int B, int K);
/* dlogits (B,K) of the mean loss. */
STOCHCA_API void stochca_crossentropy_backward(stochca_real *dlogits, const stochca_real *probs,
                                               const int *labels, int B, int K);

/* ---------------------------------------------------------------------------
   Model forward and backward, StochCA */

/* Runs the model on images (B,C,S,S). labels (B) may be NULL (no loss).
   cross (L) holds the StochCA flags beta_l: where cross[l] is nonzero,
   block l's queries attend to kv->key[l] and kv->value[l] and the block's
   own keys and values are not computed. cross == NULL means
   self-attention everywhere (evaluation); kv may then be NULL. */
STOCHCA_API int stochca_forward(stochca_model *m, const stochca_real *images, const int *labels, int B,
                                const unsigned char *cross, const stochca_kv *kv, stochca_error *err);
/* Runs the frozen pretrained model on images (B,C,S,S) only as far as the
   last block's keys and values, and points kv at every block's K0 and V0.
   kv stays valid until the pretrained model's next forward. */
STOCHCA_API int stochca_pretrained_kv(stochca_model *pretrained, const stochca_real *images, int B,
                                      stochca_kv *kv, stochca_error *err);
STOCHCA_API void stochca_zero_grad(stochca_model *m);
/* Adds the gradient of the mean loss of the last forward to m->grads.
   In cross-attention blocks no gradient reaches the K and V rows of
   qkv_w and qkv_b, and nothing flows into the pretrained model. */
STOCHCA_API int stochca_backward(stochca_model *m, stochca_error *err);
/* Draws beta_l ~ Bernoulli(p) for each of the L blocks into cross (L). */
STOCHCA_API void stochca_draw_cross(stochca_rng *rng, float p, int L, unsigned char *cross);

/* Cache of the pretrained model's keys and values per training image. When
   the training images do not change between epochs, K0 and V0 of an image
   are the same in every epoch, so the pretrained forward runs once per
   image instead of once per step. It costs count * L * T * 2D values. */
typedef struct {
    stochca_real *memory;        /* (count, L, T, 2D): per image and block, K0 rows then V0 rows */
    unsigned char *filled;       /* (count) 1 once an image's entry is stored */
    stochca_real *batch;         /* (L, B, T, 2D) the entries of one batch, gathered */
    int count, depth, tokens, dim, batch_capacity;
} stochca_kv_cache;

/* Bytes that stochca_kv_cache_init allocates for count images. */
STOCHCA_API double stochca_kv_cache_bytes(const stochca_config *c, int count, int batch_capacity);
/* Allocates a cache for count images and batches of up to batch_capacity.
   Fails with STOCHCA_ERR_NOMEM, allocating nothing, when it would need more
   than budget_bytes; the caller then recomputes K0 and V0 every step. */
STOCHCA_API int stochca_kv_cache_init(stochca_kv_cache *cache, const stochca_config *c, int count,
                                      int batch_capacity, double budget_bytes, stochca_error *err);
STOCHCA_API void stochca_kv_cache_free(stochca_kv_cache *cache);
/* Points kv at K0 and V0 of the images (B,C,S,S) whose cache entries are
   indices (B). If any entry is missing, the pretrained model runs on the
   batch and its results are stored; otherwise nothing is computed. */
STOCHCA_API int stochca_kv_cache_lookup(stochca_kv_cache *cache, stochca_model *pretrained,
                                        const stochca_real *images, const int *indices, int B,
                                        stochca_kv *kv, stochca_error *err);

/* Floating-point operations per image of one forward pass, or of one
   training step (forward and backward) with the StochCA flags cross (L,
   NULL for none), counting 2 per multiply-add of the matrix products.
   with_pretrained adds the pretrained model's forward up to its last K0, V0. */
STOCHCA_API double stochca_flops_forward(const stochca_config *c);
STOCHCA_API double stochca_flops_train_step(const stochca_config *c, const unsigned char *cross, int with_pretrained);

/* ---------------------------------------------------------------------------
   Optimizer and regularizers */

/* Default AdamW settings: lr 5e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.05. */
STOCHCA_API stochca_adamw stochca_adamw_default(void);
/* One AdamW step with bias correction over all parameters. */
STOCHCA_API void stochca_adamw_update(stochca_model *m, const stochca_adamw *opt);
/* Learning rate of step t (0-based) of `total`: linear warm-up from
   base/warmup to base over the first `warmup` steps, then cosine decay
   that would reach 0 at step `total`. */
STOCHCA_API float stochca_cosine_lr(float base, long t, long warmup, long total);
/* L2-SP: adds alpha * (theta - theta0) to the backbone gradients and
   returns the penalty (alpha/2) * sum (theta - theta0)^2. */
STOCHCA_API double stochca_l2sp(stochca_model *m, const stochca_model *pretrained, float alpha);
/* Euclidean norm of all gradients (NaN if any gradient is NaN). */
STOCHCA_API double stochca_grad_norm(const stochca_model *m);

/* ---------------------------------------------------------------------------
   Checkpoints */

/* Writes parameters (and, with with_optimizer, the AdamW state and rng)
   to path. The data goes to "path.tmp" first and is renamed over path
   only when complete, so a failure never leaves a partial file at path. */
STOCHCA_API int stochca_checkpoint_save(const stochca_model *m, const stochca_rng *rng, const char *path,
                                        int with_optimizer, stochca_error *err);
/* Reads only the configuration stored in a checkpoint. */
STOCHCA_API int stochca_checkpoint_read_config(const char *path, stochca_config *c, stochca_error *err);
/* Loads a checkpoint into an initialized model of the same configuration.
   AdamW state and rng are restored when present in the file and when the
   model has moments (rng may be NULL). Checks magic, version,
   configuration and file size, and names the one that is wrong. */
STOCHCA_API int stochca_checkpoint_load(stochca_model *m, stochca_rng *rng, const char *path,
                                        stochca_error *err);

/* ---------------------------------------------------------------------------
   Random numbers */

STOCHCA_API void stochca_rng_seed(stochca_rng *rng, uint64_t seed);
STOCHCA_API uint64_t stochca_rng_next(stochca_rng *rng);
/* Uniform in [0, 1) with 24 random bits. */
STOCHCA_API float stochca_rng_uniform(stochca_rng *rng);
/* Standard normal (Box-Muller). */
STOCHCA_API double stochca_rng_normal(stochca_rng *rng);

#ifdef __cplusplus
}
#endif
#endif /* STOCHCA_H */

/* ===========================================================================
   Implementation
   =========================================================================== */
#ifdef STOCHCA_IMPLEMENTATION
#ifndef STOCHCA_IMPLEMENTATION_DONE
#define STOCHCA_IMPLEMENTATION_DONE

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(STOCHCA_MALLOC) != defined(STOCHCA_FREE)
#error "define both STOCHCA_MALLOC and STOCHCA_FREE, or neither"
#endif
#ifndef STOCHCA_MALLOC
#define STOCHCA_MALLOC(n) malloc(n)
#define STOCHCA_FREE(p) free(p)
#endif

#ifdef _OPENMP
#define STOCHCA__OMP(x) _Pragma(#x)
#else
#define STOCHCA__OMP(x)
#endif

/* GCC vectorizes a kernel much worse once it is inlined into the function
   that OpenMP outlines for a parallel loop (measured 8x slower for the
   matrix multiply), so the kernels called from parallel loops stay out of line. */
#if defined(__GNUC__) || defined(__clang__)
#define STOCHCA__NOINLINE __attribute__((noinline))
#else
#define STOCHCA__NOINLINE
#endif

/* Marks a helper that some configurations do not call. */
#if defined(__GNUC__) || defined(__clang__)
#define STOCHCA__MAYBE_UNUSED __attribute__((unused))
#else
#define STOCHCA__MAYBE_UNUSED
#endif

/* The float build has its own exp and erf (see "exp and erf for the float
   build"). Under -ffast-math it uses libm's, because that flag would
   reorder the rounding step of the own exp. */
#ifdef STOCHCA_DOUBLE
#define STOCHCA__EXP exp
#define STOCHCA__SQRT sqrt
#define STOCHCA__ERF erf
#define STOCHCA__LOG log
#elif defined(__FAST_MATH__)
#define STOCHCA__EXP expf
#define STOCHCA__SQRT sqrtf
#define STOCHCA__ERF erff
#define STOCHCA__LOG logf
#else
#define STOCHCA__EXP stochca__exp_float
#define STOCHCA__SQRT sqrtf
#define STOCHCA__ERF stochca__erf_float
#define STOCHCA__LOG logf
#endif

#define STOCHCA__LN_EPS ((stochca_real)1e-6)       /* torchvision's ViT LayerNorm eps */
#define STOCHCA__INV_SQRT2 ((stochca_real)0.70710678118654752440)
#define STOCHCA__INV_SQRT2PI ((stochca_real)0.39894228040143267794)

#ifdef __cplusplus
extern "C" {
#endif

static int stochca__fail(stochca_error *err, int status, const char *fmt, ...)
{
    if (err) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, args);
        va_end(args);
    }
    return status;
}

/* ---------------------------------------------------------------------------
   Configuration and the parameter table */

/* Upper bound for every configuration number. With the checks on T*3D and
   C*P*P below and on the batch in stochca_model_reserve, it keeps the int
   products of sizes in the kernels (B*T, B*H, T*3D) below INT_MAX. */
#define STOCHCA__MAX_SIZE 65536

STOCHCA_API int stochca_num_tokens(const stochca_config *c)
{
    int side = c->image_size / c->patch_size;
    return side * side + 1;
}

STOCHCA_API int stochca_config_validate(const stochca_config *c, stochca_error *err)
{
    const int values[8] = {c->image_size, c->channels, c->patch_size, c->dim,
                           c->depth, c->heads, c->mlp_dim, c->classes};
    static const char *const names[8] = {"image_size", "channels", "patch_size", "dim",
                                         "depth", "heads", "mlp_dim", "classes"};
    int i;
    for (i = 0; i < 8; i++)
        if (values[i] < 1 || values[i] > STOCHCA__MAX_SIZE)
            return stochca__fail(err, STOCHCA_ERR_CONFIG, "invalid configuration: %s = %d, expected 1 to %d",
                                 names[i], values[i], STOCHCA__MAX_SIZE);
    if (c->image_size % c->patch_size != 0)
        return stochca__fail(err, STOCHCA_ERR_CONFIG,
                             "invalid configuration: image_size %d is not divisible by patch_size %d",
                             c->image_size, c->patch_size);
    if (c->dim % c->heads != 0)
        return stochca__fail(err, STOCHCA_ERR_CONFIG,
                             "invalid configuration: dim %d is not divisible by heads %d", c->dim, c->heads);
    if (c->depth > STOCHCA_MAX_DEPTH)
        return stochca__fail(err, STOCHCA_ERR_CONFIG, "invalid configuration: depth %d exceeds the maximum %d",
                             c->depth, STOCHCA_MAX_DEPTH);
    if ((long)stochca_num_tokens(c) * 3 * c->dim > STOCHCA__MAX_SIZE * 64L ||
        (long)c->channels * c->patch_size * c->patch_size > STOCHCA__MAX_SIZE)
        return stochca__fail(err, STOCHCA_ERR_CONFIG,
                             "invalid configuration: %d tokens of dim %d or patches of %d values are too large",
                             stochca_num_tokens(c), c->dim, c->channels * c->patch_size * c->patch_size);
    return STOCHCA_OK;
}

/* The symbolic sizes that a tensor dimension can have. */
enum { STOCHCA__ONE, STOCHCA__C, STOCHCA__P, STOCHCA__T, STOCHCA__D, STOCHCA__3D, STOCHCA__M, STOCHCA__K };

typedef struct {
    const char *name;
    size_t field;     /* offsetof the pointer in stochca_params or stochca_block */
    int ndim;
    int dims[4];
} stochca__tensor_spec;

/* The single table of parameters. Its order is torchvision's state-dict
   order: a module's own parameters first, then its submodules. */
static const stochca__tensor_spec stochca__stem_tensors[4] = {
    {"class_token", offsetof(stochca_params, class_token), 3, {STOCHCA__ONE, STOCHCA__ONE, STOCHCA__D, 0}},
    {"conv_proj.weight", offsetof(stochca_params, patch_w), 4, {STOCHCA__D, STOCHCA__C, STOCHCA__P, STOCHCA__P}},
    {"conv_proj.bias", offsetof(stochca_params, patch_b), 1, {STOCHCA__D, 0, 0, 0}},
    {"encoder.pos_embedding", offsetof(stochca_params, pos_embed), 3, {STOCHCA__ONE, STOCHCA__T, STOCHCA__D, 0}},
};
static const stochca__tensor_spec stochca__block_tensors[12] = {
    {"ln_1.weight", offsetof(stochca_block, ln1_w), 1, {STOCHCA__D, 0, 0, 0}},
    {"ln_1.bias", offsetof(stochca_block, ln1_b), 1, {STOCHCA__D, 0, 0, 0}},
    {"self_attention.in_proj_weight", offsetof(stochca_block, qkv_w), 2, {STOCHCA__3D, STOCHCA__D, 0, 0}},
    {"self_attention.in_proj_bias", offsetof(stochca_block, qkv_b), 1, {STOCHCA__3D, 0, 0, 0}},
    {"self_attention.out_proj.weight", offsetof(stochca_block, proj_w), 2, {STOCHCA__D, STOCHCA__D, 0, 0}},
    {"self_attention.out_proj.bias", offsetof(stochca_block, proj_b), 1, {STOCHCA__D, 0, 0, 0}},
    {"ln_2.weight", offsetof(stochca_block, ln2_w), 1, {STOCHCA__D, 0, 0, 0}},
    {"ln_2.bias", offsetof(stochca_block, ln2_b), 1, {STOCHCA__D, 0, 0, 0}},
    {"mlp.0.weight", offsetof(stochca_block, fc1_w), 2, {STOCHCA__M, STOCHCA__D, 0, 0}},
    {"mlp.0.bias", offsetof(stochca_block, fc1_b), 1, {STOCHCA__M, 0, 0, 0}},
    {"mlp.3.weight", offsetof(stochca_block, fc2_w), 2, {STOCHCA__D, STOCHCA__M, 0, 0}},
    {"mlp.3.bias", offsetof(stochca_block, fc2_b), 1, {STOCHCA__D, 0, 0, 0}},
};
static const stochca__tensor_spec stochca__tail_tensors[4] = {
    {"encoder.ln.weight", offsetof(stochca_params, lnf_w), 1, {STOCHCA__D, 0, 0, 0}},
    {"encoder.ln.bias", offsetof(stochca_params, lnf_b), 1, {STOCHCA__D, 0, 0, 0}},
    {"heads.head.weight", offsetof(stochca_params, head_w), 2, {STOCHCA__K, STOCHCA__D, 0, 0}},
    {"heads.head.bias", offsetof(stochca_params, head_b), 1, {STOCHCA__K, 0, 0, 0}},
};

STOCHCA_API int stochca_num_tensors(const stochca_config *c)
{
    return 4 + 12 * c->depth + 4;
}

static int stochca__dim_value(const stochca_config *c, int symbol)
{
    switch (symbol) {
    case STOCHCA__C: return c->channels;
    case STOCHCA__P: return c->patch_size;
    case STOCHCA__T: return stochca_num_tokens(c);
    case STOCHCA__D: return c->dim;
    case STOCHCA__3D: return 3 * c->dim;
    case STOCHCA__M: return c->mlp_dim;
    case STOCHCA__K: return c->classes;
    default: return 1;
    }
}

/* Finds tensor i's spec and, when views is given, the address of its view
   pointer. Returns the block index (-1 outside the blocks). */
static int stochca__tensor_lookup(const stochca_config *c, int i, const stochca__tensor_spec **spec,
                                  stochca_params *views, stochca_real ***slot)
{
    int block = -1;
    char *base = (char *)views;
    if (i < 4) {
        *spec = &stochca__stem_tensors[i];
    } else if (i < 4 + 12 * c->depth) {
        block = (i - 4) / 12;
        *spec = &stochca__block_tensors[(i - 4) % 12];
        base = views ? (char *)&views->block[block] : NULL;
    } else {
        *spec = &stochca__tail_tensors[i - 4 - 12 * c->depth];
    }
    if (slot)
        *slot = views ? (stochca_real **)(base + (*spec)->field) : NULL;
    return block;
}

static size_t stochca__tensor_numel(const stochca_config *c, const stochca__tensor_spec *spec)
{
    size_t n = 1;
    int k;
    for (k = 0; k < spec->ndim; k++)
        n *= (size_t)stochca__dim_value(c, spec->dims[k]);
    return n;
}

STOCHCA_API void stochca_tensor_info_at(const stochca_config *c, int i, stochca_tensor_info *info)
{
    const stochca__tensor_spec *spec;
    int block = stochca__tensor_lookup(c, i, &spec, NULL, NULL);
    int j, k;
    if (block >= 0)
        snprintf(info->name, sizeof info->name, "encoder.layers.encoder_layer_%d.%s", block, spec->name);
    else
        snprintf(info->name, sizeof info->name, "%s", spec->name);
    info->ndim = spec->ndim;
    for (k = 0; k < 4; k++)
        info->shape[k] = k < spec->ndim ? stochca__dim_value(c, spec->dims[k]) : 0;
    info->numel = stochca__tensor_numel(c, spec);
    info->offset = 0;
    for (j = 0; j < i; j++) {
        const stochca__tensor_spec *before;
        stochca__tensor_lookup(c, j, &before, NULL, NULL);
        info->offset += stochca__tensor_numel(c, before);
    }
}

/* Points every view in `views` into memory (NULL: only counts).
   Returns the number of parameters. */
static size_t stochca__layout_params(const stochca_config *c, stochca_real *memory, stochca_params *views)
{
    size_t offset = 0;
    int i, n = stochca_num_tensors(c);
    for (i = 0; i < n; i++) {
        const stochca__tensor_spec *spec;
        stochca_real **slot;
        stochca__tensor_lookup(c, i, &spec, views, &slot);
        if (slot)
            *slot = memory + offset;
        offset += stochca__tensor_numel(c, spec);
    }
    return offset;
}

/* ---------------------------------------------------------------------------
   Activation layout */

/* Hands out consecutive pieces of one allocation, with overflow checks. */
typedef struct {
    stochca_real *memory;   /* NULL while counting */
    size_t used;
    int overflow;
} stochca__arena;

static stochca_real *stochca__take(stochca__arena *a, size_t n0, size_t n1, size_t n2, size_t n3)
{
    const size_t limit = (size_t)-1 / sizeof(stochca_real);
    size_t n = n0;
    stochca_real *piece;
    if (n1 && n > limit / n1) a->overflow = 1; else n *= n1;
    if (n2 && n > limit / n2) a->overflow = 1; else n *= n2;
    if (n3 && n > limit / n3) a->overflow = 1; else n *= n3;
    if (a->overflow || n > limit - a->used) {
        a->overflow = 1;
        return NULL;
    }
    piece = a->memory ? a->memory + a->used : NULL;
    a->used += n;
    return piece;
}

static void stochca__layout_acts(const stochca_config *c, int B, stochca__arena *a, stochca_acts *acts)
{
    size_t b = (size_t)B, t = (size_t)stochca_num_tokens(c), d = (size_t)c->dim;
    size_t n = t - 1, m = (size_t)c->mlp_dim, h = (size_t)c->heads, k = (size_t)c->classes;
    size_t patch = (size_t)c->channels * (size_t)c->patch_size * (size_t)c->patch_size;
    int l;
    acts->patches = stochca__take(a, b, n, patch, 1);
    acts->patch_emb = stochca__take(a, b, n, d, 1);
    acts->embed = stochca__take(a, b, t, d, 1);
    for (l = 0; l < c->depth; l++) {
        stochca_block_acts *ba = &acts->block[l];
        ba->ln1 = stochca__take(a, b, t, d, 1);
        ba->ln1_mean = stochca__take(a, b, t, 1, 1);
        ba->ln1_rstd = stochca__take(a, b, t, 1, 1);
        ba->qkv = stochca__take(a, b, t, 3 * d, 1);
        ba->probs = stochca__take(a, b, h, t, t);
        ba->attn = stochca__take(a, b, t, d, 1);
        ba->proj = stochca__take(a, b, t, d, 1);
        ba->resid = stochca__take(a, b, t, d, 1);
        ba->ln2 = stochca__take(a, b, t, d, 1);
        ba->ln2_mean = stochca__take(a, b, t, 1, 1);
        ba->ln2_rstd = stochca__take(a, b, t, 1, 1);
        ba->fc1 = stochca__take(a, b, t, m, 1);
        ba->gelu = stochca__take(a, b, t, m, 1);
        ba->fc2 = stochca__take(a, b, t, d, 1);
        ba->out = stochca__take(a, b, t, d, 1);
    }
    acts->lnf = stochca__take(a, b, d, 1, 1);
    acts->lnf_mean = stochca__take(a, b, 1, 1, 1);
    acts->lnf_rstd = stochca__take(a, b, 1, 1, 1);
    acts->logits = stochca__take(a, b, k, 1, 1);
    acts->probs = stochca__take(a, b, k, 1, 1);
    acts->losses = stochca__take(a, b, 1, 1, 1);
}

/* Size of the scratch buffer: the largest weight matrix, which the linear
   forward transposes, or a batch of (B,T,D) for attention. */
static size_t stochca__scratch_size(const stochca_config *c, int B)
{
    size_t d = (size_t)c->dim, best = (size_t)B * (size_t)stochca_num_tokens(c) * d;
    if (3 * d * d > best) best = 3 * d * d;
    size_t patch = (size_t)c->channels * (size_t)c->patch_size * (size_t)c->patch_size;
    if ((size_t)c->mlp_dim * d > best) best = (size_t)c->mlp_dim * d;
    if ((size_t)c->classes * d > best) best = (size_t)c->classes * d;
    if (patch * d > best) best = patch * d;
    return best;
}

/* ---------------------------------------------------------------------------
   Model life cycle */

static stochca_real *stochca__alloc(size_t count)
{
    if (count == 0 || count > (size_t)-1 / sizeof(stochca_real))
        return NULL;
    return (stochca_real *)STOCHCA_MALLOC(count * sizeof(stochca_real));
}

STOCHCA_API int stochca_model_init(stochca_model *m, const stochca_config *c, stochca_error *err)
{
    int status = stochca_config_validate(c, err);
    memset(m, 0, sizeof *m);
    if (status != STOCHCA_OK)
        return status;
    m->config = *c;
    m->num_params = stochca__layout_params(c, NULL, NULL);
    m->param_memory = stochca__alloc(m->num_params);
    if (!m->param_memory)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory for %zu parameters", m->num_params);
    memset(m->param_memory, 0, m->num_params * sizeof(stochca_real));
    stochca__layout_params(c, m->param_memory, &m->params);
    return STOCHCA_OK;
}

static void stochca__free_buffers(stochca_model *m)
{
    STOCHCA_FREE(m->grad_memory);
    STOCHCA_FREE(m->adam_memory);
    STOCHCA_FREE(m->act_memory);
    STOCHCA_FREE(m->grad_act_memory);
    STOCHCA_FREE(m->scratch);
    STOCHCA_FREE(m->labels);
    m->grad_memory = m->adam_memory = m->act_memory = m->grad_act_memory = m->scratch = NULL;
    m->labels = NULL;
    m->batch_capacity = 0;
    m->num_acts = 0;
}

static int stochca__reserve_training(stochca_model *m, stochca_error *err)
{
    m->grad_memory = stochca__alloc(m->num_params);
    m->adam_memory = m->num_params <= (size_t)-1 / 2 ? stochca__alloc(2 * m->num_params) : NULL;
    m->grad_act_memory = stochca__alloc(m->num_acts);
    if (!m->grad_memory || !m->adam_memory || !m->grad_act_memory)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory for gradients and AdamW moments "
                             "(%zu parameters, %zu activations)", m->num_params, m->num_acts);
    memset(m->grad_memory, 0, m->num_params * sizeof(stochca_real));
    memset(m->adam_memory, 0, 2 * m->num_params * sizeof(stochca_real));
    stochca__layout_params(&m->config, m->grad_memory, &m->grads);
    {
        stochca__arena arena = {NULL, 0, 0};
        arena.memory = m->grad_act_memory;
        stochca__layout_acts(&m->config, m->batch_capacity, &arena, &m->grad_acts);
    }
    m->adam_step = 0;
    return STOCHCA_OK;
}

STOCHCA_API int stochca_model_reserve(stochca_model *m, int batch_capacity, int training, stochca_error *err)
{
    stochca__arena arena = {NULL, 0, 0};
    int status;
    if (batch_capacity < 1 ||
        (double)batch_capacity * stochca_num_tokens(&m->config) * (m->config.heads + 3 * m->config.dim) > INT_MAX)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid batch capacity %d, expected 1 to %.0f for this "
                             "configuration", batch_capacity,
                             floor(INT_MAX / ((double)stochca_num_tokens(&m->config) *
                                              (m->config.heads + 3 * m->config.dim))));
    stochca__free_buffers(m);
    stochca__layout_acts(&m->config, batch_capacity, &arena, &m->acts);
    if (arena.overflow)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "activations for batch %d overflow size_t", batch_capacity);
    m->num_acts = arena.used;
    m->batch_capacity = batch_capacity;
    m->act_memory = stochca__alloc(m->num_acts);
    m->scratch = stochca__alloc(stochca__scratch_size(&m->config, batch_capacity));
    m->labels = (int *)STOCHCA_MALLOC((size_t)batch_capacity * sizeof(int));
    if (!m->act_memory || !m->scratch || !m->labels) {
        stochca__free_buffers(m);
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory for %zu activations (batch %d)",
                             m->num_acts, batch_capacity);
    }
    arena.memory = m->act_memory;
    arena.used = 0;
    stochca__layout_acts(&m->config, batch_capacity, &arena, &m->acts);
    if (training) {
        status = stochca__reserve_training(m, err);
        if (status != STOCHCA_OK) {
            stochca__free_buffers(m);
            return status;
        }
    }
    return STOCHCA_OK;
}

STOCHCA_API void stochca_model_free(stochca_model *m)
{
    stochca__free_buffers(m);
    STOCHCA_FREE(m->param_memory);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------------------
   Random numbers */

STOCHCA_API void stochca_rng_seed(stochca_rng *rng, uint64_t seed)
{
    rng->state = seed;
}

STOCHCA_API uint64_t stochca_rng_next(stochca_rng *rng)
{
    uint64_t z = (rng->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

STOCHCA_API float stochca_rng_uniform(stochca_rng *rng)
{
    return (float)(stochca_rng_next(rng) >> 40) * (1.0f / 16777216.0f);
}

STOCHCA_API double stochca_rng_normal(stochca_rng *rng)
{
    /* 1 - u lies in (0, 1], so the logarithm is finite. */
    double u1 = 1.0 - (double)(stochca_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
    double u2 = (double)(stochca_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u1)) * cos(6.28318530717958647692 * u2);
}

/* ---------------------------------------------------------------------------
   Initialization */

static void stochca__fill_uniform(stochca_real *x, size_t n, double bound, stochca_rng *rng)
{
    size_t i;
    for (i = 0; i < n; i++)
        x[i] = (stochca_real)(bound * (2.0 * stochca_rng_uniform(rng) - 1.0));
}

static void stochca__fill_normal(stochca_real *x, size_t n, double std, double limit, stochca_rng *rng)
{
    size_t i;
    for (i = 0; i < n; i++) {
        double z;
        do {
            z = stochca_rng_normal(rng);
        } while (limit > 0 && fabs(z) > limit);
        x[i] = (stochca_real)(std * z);
    }
}

static void stochca__fill_constant(stochca_real *x, size_t n, stochca_real value)
{
    size_t i;
    for (i = 0; i < n; i++)
        x[i] = value;
}

STOCHCA_API void stochca_model_init_random(stochca_model *m, stochca_rng *rng)
{
    const stochca_config *c = &m->config;
    stochca_params *p = &m->params;
    size_t d = (size_t)c->dim, mlp = (size_t)c->mlp_dim, t = (size_t)stochca_num_tokens(c);
    size_t patch = (size_t)c->channels * (size_t)c->patch_size * (size_t)c->patch_size;
    int l;

    memset(m->param_memory, 0, m->num_params * sizeof(stochca_real));
    stochca__fill_normal(p->patch_w, d * patch, sqrt(1.0 / (double)patch), 2.0, rng);
    stochca__fill_normal(p->pos_embed, t * d, 0.02, 0.0, rng);
    for (l = 0; l < c->depth; l++) {
        stochca_block *bl = &p->block[l];
        stochca__fill_constant(bl->ln1_w, d, 1);
        stochca__fill_constant(bl->ln2_w, d, 1);
        stochca__fill_uniform(bl->qkv_w, 3 * d * d, sqrt(6.0 / (double)(4 * d)), rng);
        stochca__fill_uniform(bl->proj_w, d * d, sqrt(1.0 / (double)d), rng);
        stochca__fill_uniform(bl->fc1_w, mlp * d, sqrt(6.0 / (double)(mlp + d)), rng);
        stochca__fill_uniform(bl->fc2_w, d * mlp, sqrt(6.0 / (double)(mlp + d)), rng);
        stochca__fill_normal(bl->fc1_b, mlp, 1e-6, 0.0, rng);
        stochca__fill_normal(bl->fc2_b, d, 1e-6, 0.0, rng);
    }
    stochca__fill_constant(p->lnf_w, d, 1);
}

STOCHCA_API int stochca_model_init_transfer(stochca_model *target, const stochca_model *pretrained,
                                            int classes, stochca_error *err)
{
    stochca_config c = pretrained->config;
    size_t backbone;
    int status;
    c.classes = classes;
    status = stochca_model_init(target, &c, err);
    if (status != STOCHCA_OK)
        return status;
    backbone = (size_t)(pretrained->params.head_w - pretrained->param_memory);
    memcpy(target->param_memory, pretrained->param_memory, backbone * sizeof(stochca_real));
    return STOCHCA_OK;
}

/* ---------------------------------------------------------------------------
   Patch embedding */

STOCHCA_API void stochca_patchify(stochca_real *patches, const stochca_real *images,
                                  int B, int C, int S, int P)
{
    int side = S / P, N = side * side, b;
    STOCHCA__OMP(omp parallel for)
    for (b = 0; b < B; b++) {
        int n, ch, y, x;
        for (n = 0; n < N; n++) {
            int row0 = (n / side) * P, col0 = (n % side) * P;
            stochca_real *dst = patches + ((size_t)b * N + n) * C * P * P;
            for (ch = 0; ch < C; ch++)
                for (y = 0; y < P; y++)
                    for (x = 0; x < P; x++)
                        *dst++ = images[(((size_t)b * C + ch) * S + row0 + y) * S + col0 + x];
        }
    }
}

/* ---------------------------------------------------------------------------
   Matrix multiply, the kernel under the linear layers and attention.

   C (M,N) += A (M,K) B (K,N). B and C are row-major with row strides ldb
   and ldc. Element (m,k) of A is A[m*a_row + k*a_col], so (a_row, a_col) =
   (lda, 1) reads A as stored and (1, lda) reads it transposed, which gives
   dW = dout^T x without a copy. The work is cut into tiles of 8 rows by 16
   columns whose sums stay in local arrays that compilers keep in vector
   registers. Every element of C adds its K products in increasing k,
   starting from its old value, and every tile, edges included, runs the
   same kernel, so the result does not depend on the tiling or on the
   thread count. */

#define STOCHCA__TILE_M 8
#define STOCHCA__TILE_N 16
#define STOCHCA__PANEL_K 256

/* Shape and strides of one multiply. */
typedef struct {
    const stochca_real *A;
    const stochca_real *B;
    stochca_real *C;
    size_t a_row, a_col;
    int ldb, ldc;
    int M, K, N;
} stochca__matmul_args;

/* The inner kernel: c (8,16) += a (8,kc) b (kc,16), where panel contains a
   packed column by column, panel[k*8 + i] = a[i,k]. Compilers keep the sums
   of the local array in vector registers. The column loop is innermost, so
   it compiles to vector multiply-adds with a broadcast. */
static void stochca__matmul_kernel(stochca_real *c, size_t ldc, const stochca_real *panel,
                                   const stochca_real *b, size_t ldb, int kc)
{
    stochca_real c0[STOCHCA__TILE_N], c1[STOCHCA__TILE_N], c2[STOCHCA__TILE_N], c3[STOCHCA__TILE_N];
    stochca_real c4[STOCHCA__TILE_N], c5[STOCHCA__TILE_N], c6[STOCHCA__TILE_N], c7[STOCHCA__TILE_N];
    int n, k;
    for (n = 0; n < STOCHCA__TILE_N; n++) {
        c0[n] = c[n];
        c1[n] = c[ldc + n];
        c2[n] = c[2 * ldc + n];
        c3[n] = c[3 * ldc + n];
        c4[n] = c[4 * ldc + n];
        c5[n] = c[5 * ldc + n];
        c6[n] = c[6 * ldc + n];
        c7[n] = c[7 * ldc + n];
    }
    for (k = 0; k < kc; k++, b += ldb, panel += STOCHCA__TILE_M)
        for (n = 0; n < STOCHCA__TILE_N; n++) {
            c0[n] += panel[0] * b[n];
            c1[n] += panel[1] * b[n];
            c2[n] += panel[2] * b[n];
            c3[n] += panel[3] * b[n];
            c4[n] += panel[4] * b[n];
            c5[n] += panel[5] * b[n];
            c6[n] += panel[6] * b[n];
            c7[n] += panel[7] * b[n];
        }
    for (n = 0; n < STOCHCA__TILE_N; n++) {
        c[n] = c0[n];
        c[ldc + n] = c1[n];
        c[2 * ldc + n] = c2[n];
        c[3 * ldc + n] = c3[n];
        c[4 * ldc + n] = c4[n];
        c[5 * ldc + n] = c5[n];
        c[6 * ldc + n] = c6[n];
        c[7 * ldc + n] = c7[n];
    }
}

/* Copies a (rows, kc), the block of A at row m0 and column k0, into panel
   column by column. The rows beyond the edge of A are zero. */
static void stochca__matmul_pack(stochca_real *panel, const stochca__matmul_args *g, int m0, int rows,
                                 int k0, int kc)
{
    int i, k;
    if (rows < STOCHCA__TILE_M)
        memset(panel, 0, (size_t)kc * STOCHCA__TILE_M * sizeof(stochca_real));
    for (i = 0; i < rows; i++) {
        const stochca_real *a = g->A + (size_t)(m0 + i) * g->a_row + (size_t)k0 * g->a_col;
        for (k = 0; k < kc; k++)
            panel[k * STOCHCA__TILE_M + i] = a[(size_t)k * g->a_col];
    }
}

/* Runs the kernel on a tile cut by the bottom or right edge of C. It works
   on copies padded with zeros and writes back only the rows and columns inside C. */
static void stochca__matmul_edge(stochca_real *c, size_t ldc, const stochca_real *panel, const stochca_real *b,
                                 size_t ldb, int kc, int rows, int cols)
{
    stochca_real c_pad[STOCHCA__TILE_M * STOCHCA__TILE_N];
    stochca_real b_pad[STOCHCA__PANEL_K * STOCHCA__TILE_N];
    int i, n, k;
    for (i = 0; i < STOCHCA__TILE_M; i++)
        for (n = 0; n < STOCHCA__TILE_N; n++)
            c_pad[i * STOCHCA__TILE_N + n] = i < rows && n < cols ? c[i * ldc + n] : 0;
    for (k = 0; k < kc; k++)
        for (n = 0; n < STOCHCA__TILE_N; n++)
            b_pad[k * STOCHCA__TILE_N + n] = n < cols ? b[k * ldb + n] : 0;
    stochca__matmul_kernel(c_pad, STOCHCA__TILE_N, panel, b_pad, STOCHCA__TILE_N, kc);
    for (i = 0; i < rows; i++)
        for (n = 0; n < cols; n++)
            c[i * ldc + n] = c_pad[i * STOCHCA__TILE_N + n];
}

/* Computes the rows [m0, m0 + 8) of C, or fewer at the bottom edge. K is
   cut into blocks of at most 256, so that the packed rows of A fit on the
   stack. Each block adds its products to C in increasing k, so every
   element of C still sums its K products in order. */
static STOCHCA__NOINLINE void stochca__matmul_rows(const stochca__matmul_args *g, int m0)
{
    stochca_real panel[STOCHCA__PANEL_K * STOCHCA__TILE_M];
    const int rows = g->M - m0 < STOCHCA__TILE_M ? g->M - m0 : STOCHCA__TILE_M;
    const size_t ldb = (size_t)g->ldb, ldc = (size_t)g->ldc;
    int k0, n0;
    for (k0 = 0; k0 < g->K; k0 += STOCHCA__PANEL_K) {
        const int kc = g->K - k0 < STOCHCA__PANEL_K ? g->K - k0 : STOCHCA__PANEL_K;
        stochca__matmul_pack(panel, g, m0, rows, k0, kc);
        for (n0 = 0; n0 < g->N; n0 += STOCHCA__TILE_N) {
            const int cols = g->N - n0 < STOCHCA__TILE_N ? g->N - n0 : STOCHCA__TILE_N;
            stochca_real *c = g->C + (size_t)m0 * ldc + n0;
            const stochca_real *b = g->B + (size_t)k0 * ldb + n0;
            if (rows == STOCHCA__TILE_M && cols == STOCHCA__TILE_N)
                stochca__matmul_kernel(c, ldc, panel, b, ldb, kc);
            else
                stochca__matmul_edge(c, ldc, panel, b, ldb, kc, rows, cols);
        }
    }
}

/* parallel = 0 for callers that already run in parallel. Otherwise the row
   tiles, which no two threads share, are split over threads. */
static void stochca__matmul(const stochca__matmul_args *g, int parallel)
{
    const int tiles = (g->M + STOCHCA__TILE_M - 1) / STOCHCA__TILE_M;
    int t;
    if (!parallel) {
        for (t = 0; t < tiles; t++)
            stochca__matmul_rows(g, t * STOCHCA__TILE_M);
        return;
    }
    STOCHCA__OMP(omp parallel for schedule(static))
    for (t = 0; t < tiles; t++)
        stochca__matmul_rows(g, t * STOCHCA__TILE_M);
}

/* Fills the arguments of C (M,N) += A (M,K) B (K,N); see above for a_row, a_col. */
static stochca__matmul_args stochca__mm(stochca_real *C, int ldc, const stochca_real *A, size_t a_row,
                                        size_t a_col, const stochca_real *B, int ldb, int M, int K, int N)
{
    stochca__matmul_args g;
    g.A = A;
    g.B = B;
    g.C = C;
    g.a_row = a_row;
    g.a_col = a_col;
    g.ldb = ldb;
    g.ldc = ldc;
    g.M = M;
    g.K = K;
    g.N = N;
    return g;
}

/* ---------------------------------------------------------------------------
   Linear layer */

/* out = inp w^T + bias. w (O,I) is transposed into scratch (I,O) first, so
   that the matrix multiply reads both operands along rows. */
STOCHCA_API void stochca_linear_forward(stochca_real *out, const stochca_real *inp,
                                        const stochca_real *w, const stochca_real *bias,
                                        stochca_real *scratch, int R, int I, int O)
{
    int r, o, i;
    for (o = 0; o < O; o++)
        for (i = 0; i < I; i++)
            scratch[(size_t)i * O + o] = w[(size_t)o * I + i];
    STOCHCA__OMP(omp parallel for private(o))
    for (r = 0; r < R; r++)
        for (o = 0; o < O; o++)
            out[(size_t)r * O + o] = bias ? bias[o] : 0;
    {
        stochca__matmul_args g = stochca__mm(out, O, inp, (size_t)I, 1, scratch, O, R, I, O);
        stochca__matmul(&g, 1);
    }
}

/* Forward: out[r,o] = sum_i inp[r,i] w[o,i] + bias[o].
   dinp (R,I) += dout (R,O) w (O,I);  dw (O,I) += dout^T (O,R) inp (R,I);
   dbias[o] += sum_r dout[r,o]. */
STOCHCA_API void stochca_linear_backward(stochca_real *dinp, stochca_real *dw, stochca_real *dbias,
                                         const stochca_real *dout, const stochca_real *inp,
                                         const stochca_real *w, int R, int I, int O)
{
    stochca__matmul_args input_grad = stochca__mm(dinp, I, dout, (size_t)O, 1, w, I, R, O, I);
    stochca__matmul_args weight_grad = stochca__mm(dw, I, dout, 1, (size_t)O, inp, I, O, R, I);
    int r, o, o0;
    if (dinp)
        stochca__matmul(&input_grad, 1);
    stochca__matmul(&weight_grad, 1);
    if (!dbias)
        return;
    /* Threads take blocks of 16 columns, and each column sums its rows in order. */
    STOCHCA__OMP(omp parallel for private(r, o))
    for (o0 = 0; o0 < O; o0 += 16)
        for (r = 0; r < R; r++)
            for (o = o0; o < o0 + 16 && o < O; o++)
                dbias[o] += dout[(size_t)r * O + o];
}

/* ---------------------------------------------------------------------------
   Class token and position embedding: z_0 = [c; e_1; ...; e_N] + E_pos */

STOCHCA_API void stochca_embed_forward(stochca_real *z, const stochca_real *patch_emb,
                                       const stochca_real *class_token, const stochca_real *pos_embed,
                                       int B, int T, int D)
{
    int b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            const stochca_real *src = t == 0 ? class_token : patch_emb + ((size_t)b * (T - 1) + t - 1) * D;
            stochca_real *dst = z + ((size_t)b * T + t) * D;
            for (c = 0; c < D; c++)
                dst[c] = src[c] + pos_embed[(size_t)t * D + c];
        }
}

STOCHCA_API void stochca_embed_backward(stochca_real *dpatch_emb, stochca_real *dclass_token,
                                        stochca_real *dpos_embed, const stochca_real *dz,
                                        int B, int T, int D)
{
    int b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            const stochca_real *g = dz + ((size_t)b * T + t) * D;
            stochca_real *dsrc = t == 0 ? dclass_token : dpatch_emb + ((size_t)b * (T - 1) + t - 1) * D;
            for (c = 0; c < D; c++) {
                dsrc[c] += g[c];
                dpos_embed[(size_t)t * D + c] += g[c];
            }
        }
}

/* ---------------------------------------------------------------------------
   LayerNorm: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps),
   with the biased variance over the D channels of a row. */

STOCHCA_API void stochca_layernorm_forward(stochca_real *out, stochca_real *mean, stochca_real *rstd,
                                           const stochca_real *inp, int inp_stride,
                                           const stochca_real *w, const stochca_real *b, int R, int D)
{
    int r;
    STOCHCA__OMP(omp parallel for)
    for (r = 0; r < R; r++) {
        const stochca_real *x = inp + (size_t)r * inp_stride;
        stochca_real *y = out + (size_t)r * D;
        stochca_real mu = 0, var = 0, s;
        int c;
        for (c = 0; c < D; c++)
            mu += x[c];
        mu /= (stochca_real)D;
        for (c = 0; c < D; c++)
            var += (x[c] - mu) * (x[c] - mu);
        var /= (stochca_real)D;
        s = 1 / STOCHCA__SQRT(var + STOCHCA__LN_EPS);
        for (c = 0; c < D; c++)
            y[c] = (x[c] - mu) * s * w[c] + b[c];
        mean[r] = mu;
        rstd[r] = s;
    }
}

/* With xhat = (x - mean) * rstd and g = dout * w:
   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw += dout * xhat, db += dout. */
STOCHCA_API void stochca_layernorm_backward(stochca_real *dinp, stochca_real *dw, stochca_real *db,
                                            const stochca_real *dout, const stochca_real *inp,
                                            int inp_stride, const stochca_real *w,
                                            const stochca_real *mean, const stochca_real *rstd,
                                            int R, int D)
{
    int r, c;
    STOCHCA__OMP(omp parallel for private(c))
    for (r = 0; r < R; r++) {
        const stochca_real *x = inp + (size_t)r * inp_stride;
        const stochca_real *dy = dout + (size_t)r * D;
        stochca_real *dx = dinp + (size_t)r * inp_stride;
        stochca_real g_mean = 0, gx_mean = 0;
        for (c = 0; c < D; c++) {
            stochca_real xhat = (x[c] - mean[r]) * rstd[r];
            g_mean += dy[c] * w[c];
            gx_mean += dy[c] * w[c] * xhat;
        }
        g_mean /= (stochca_real)D;
        gx_mean /= (stochca_real)D;
        for (c = 0; c < D; c++) {
            stochca_real xhat = (x[c] - mean[r]) * rstd[r];
            dx[c] += rstd[r] * (dy[c] * w[c] - g_mean - xhat * gx_mean);
        }
    }
    STOCHCA__OMP(omp parallel for private(r))
    for (c = 0; c < D; c++) {
        stochca_real sw = 0, sb = 0;
        for (r = 0; r < R; r++) {
            stochca_real xhat = (inp[(size_t)r * inp_stride + c] - mean[r]) * rstd[r];
            sw += dout[(size_t)r * D + c] * xhat;
            sb += dout[(size_t)r * D + c];
        }
        dw[c] += sw;
        db[c] += sb;
    }
}

/* ---------------------------------------------------------------------------
   exp and erf for the float build

   libm's expf and erff are calls that compilers do not vectorize. In a
   one-thread training step they took 17% of the time (perf: erff 13%, in
   GELU, and expf 4%, mostly in the softmax). These two compute in
   double and round once to float. Over every float argument their error is
   at most 0.6 units in the last place (tests "exp for the float build" and
   "erf for the float build"). Their only branch is a clamp done on the bits
   of the argument, which compilers turn into vector selects without having
   to assume that float comparisons never trap. */

/* Returns x with its magnitude cut to limit, a positive float. NaN passes
   unchanged. */
static float stochca__clamp_magnitude(float x, float limit)
{
    uint32_t bits, magnitude, limit_bits;
    memcpy(&bits, &x, sizeof bits);
    memcpy(&limit_bits, &limit, sizeof limit_bits);
    magnitude = bits & 0x7fffffffu;
    if (magnitude > limit_bits && magnitude <= 0x7f800000u)
        bits = (bits & 0x80000000u) | limit_bits;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* e^y = 2^n e^r with n = round(y / ln 2) and |r| <= ln(2) / 2, where the
   Taylor polynomial of degree 7 has a relative error below 1e-8. Adding
   1.5 * 2^52 rounds y / ln 2 to the integer n and leaves n in the low bits
   of the sum, and 2^n is then built from its exponent bits. |y| is cut to
   104 first, because e^-104 rounds to 0 and e^104 to infinity in float. */
static STOCHCA__MAYBE_UNUSED float stochca__exp_float(float y)
{
    const double round_bias = 6755399441055744.0; /* 1.5 * 2^52 */
    const double t = stochca__clamp_magnitude(y, 104.0f);
    double k = t * 1.4426950408889634 + round_bias, r, p, two_n;
    uint64_t bits;
    memcpy(&bits, &k, sizeof bits);
    k -= round_bias;
    r = t - k * 0.69314718055994531;
    p = 1 + r * (1 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 + r / 5040))))));
    bits = (bits + 1023) << 52;
    memcpy(&two_n, &bits, sizeof two_n);
    return (float)(p * two_n);
}

/* erf(x) ~ x P(x^2) / Q(x^2) with |x| cut to 4, where erf rounds to 1 in
   float. The coefficients are a weighted least-squares fit on [0, 4],
   reweighted toward the smallest maximum error, which is 5.5e-9. */
static STOCHCA__MAYBE_UNUSED float stochca__erf_float(float x)
{
    const double t = stochca__clamp_magnitude(x, 4.0f), s = t * t;
    const double p = ((((6.5278119676855905e-06 * s + 0.00040385505883664584) * s + 0.0041843708986214027) * s
                       + 0.055529803635255323) * s + 0.19235321052660753) * s + 1.1283791738590814;
    const double q = (((((2.4581487478300149e-07 * s + 7.064321479394742e-05) * s + 0.0014028563499111711) * s
                        + 0.01618766638523176) * s + 0.11714534388162466) * s + 0.50380205430394986) * s + 1;
    return (float)(t * p / q);
}

/* ---------------------------------------------------------------------------
   Multi-head attention: for head h, A_h = softmax(Q_h K_h^T / sqrt(d)) V_h.
   In a cross-attention block K and V are the pretrained model's K0 and V0;
   the kernel does not care where its rows come from. */

/* Copies the rows (T, d) of one head, row_stride apart, into t (d, T). */
static void stochca__transpose_head(stochca_real *t, const stochca_real *rows, int row_stride, int T, int hd)
{
    int j, c;
    for (j = 0; j < T; j++)
        for (c = 0; c < hd; c++)
            t[(size_t)c * T + j] = rows[(size_t)j * row_stride + c];
}

/* The softmax of each row of the scores (T,T), in place, after scaling. */
static void stochca__softmax_rows(stochca_real *p, int T, stochca_real scale)
{
    int i, j;
    for (i = 0; i < T; i++, p += T) {
        stochca_real max_score, sum = 0;
        for (j = 0; j < T; j++)
            p[j] *= scale;
        /* After subtracting the row maximum every exponent is at most 0, so exp cannot overflow. */
        max_score = p[0];
        for (j = 1; j < T; j++)
            if (p[j] > max_score) max_score = p[j];
        /* Two loops, so that the exp loop vectorizes and the sum keeps its order. */
        for (j = 0; j < T; j++)
            p[j] = STOCHCA__EXP(p[j] - max_score);
        for (j = 0; j < T; j++)
            sum += p[j];
        for (j = 0; j < T; j++)
            p[j] /= sum;
    }
}

/* One (image, head) pair: scores = Q K^T, probabilities, out = P V. */
static STOCHCA__NOINLINE void stochca__attention_head_forward(stochca_real *out, stochca_real *probs,
                                                              stochca_real *kt, const stochca_real *q, int q_stride,
                                                              const stochca_real *k, const stochca_real *v,
                                                              int kv_stride, int T, int D, int hd)
{
    stochca__matmul_args scores = stochca__mm(probs, T, q, (size_t)q_stride, 1, kt, T, T, hd, T);
    stochca__matmul_args values = stochca__mm(out, D, probs, (size_t)T, 1, v, kv_stride, T, T, hd);
    int i, c;

    stochca__transpose_head(kt, k, kv_stride, T, hd);
    memset(probs, 0, (size_t)T * T * sizeof(stochca_real));
    stochca__matmul(&scores, 0);
    stochca__softmax_rows(probs, T, 1 / STOCHCA__SQRT((stochca_real)hd));

    for (i = 0; i < T; i++)
        for (c = 0; c < hd; c++)
            out[(size_t)i * D + c] = 0;
    stochca__matmul(&values, 0);
}

/* scratch (B,H,d,T) receives each head's keys transposed. */
STOCHCA_API void stochca_attention_forward(stochca_real *out, stochca_real *probs, stochca_real *scratch,
                                           const stochca_real *q, int q_stride,
                                           const stochca_real *k, const stochca_real *v, int kv_stride,
                                           int B, int T, int D, int H)
{
    const int hd = D / H;
    int bh;
    STOCHCA__OMP(omp parallel for schedule(static))
    for (bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        stochca__attention_head_forward(out + (size_t)b * T * D + h * hd, probs + (size_t)bh * T * T,
                                        scratch + (size_t)bh * hd * T, q + (size_t)b * T * q_stride + h * hd,
                                        q_stride, k + (size_t)b * T * kv_stride + h * hd,
                                        v + (size_t)b * T * kv_stride + h * hd, kv_stride, T, D, hd);
    }
}

/* One (image, head) pair of the backward pass; see stochca_attention_backward. */
static STOCHCA__NOINLINE void stochca__attention_head_backward(stochca_real *dq, stochca_real *dk, stochca_real *dv,
                                                               stochca_real *dp, stochca_real *vt,
                                                               const stochca_real *g, const stochca_real *p,
                                                               const stochca_real *q, int q_stride,
                                                               const stochca_real *k, const stochca_real *v,
                                                               int kv_stride, int T, int D, int hd)
{
    const stochca_real scale = 1 / STOCHCA__SQRT((stochca_real)hd);
    stochca__matmul_args prob_grad = stochca__mm(dp, T, g, (size_t)D, 1, vt, T, T, hd, T);
    stochca__matmul_args query_grad = stochca__mm(dq, q_stride, dp, (size_t)T, 1, k, kv_stride, T, T, hd);
    stochca__matmul_args key_grad = stochca__mm(dk, kv_stride, dp, 1, (size_t)T, q, q_stride, T, T, hd);
    stochca__matmul_args value_grad = stochca__mm(dv, kv_stride, p, 1, (size_t)T, g, D, T, T, hd);
    int i, j;

    /* dP = G V^T */
    stochca__transpose_head(vt, v, kv_stride, T, hd);
    memset(dp, 0, (size_t)T * T * sizeof(stochca_real));
    stochca__matmul(&prob_grad, 0);

    /* dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), times the score scale, in place. */
    for (i = 0; i < T; i++) {
        const stochca_real *pi = p + (size_t)i * T;
        stochca_real *dpi = dp + (size_t)i * T, dot = 0;
        for (j = 0; j < T; j++)
            dot += pi[j] * dpi[j];
        for (j = 0; j < T; j++)
            dpi[j] = pi[j] * (dpi[j] - dot) * scale;
    }

    /* dQ += dS K, dK += dS^T Q, dV += P^T G */
    stochca__matmul(&query_grad, 0);
    if (dk)
        stochca__matmul(&key_grad, 0);
    if (dv)
        stochca__matmul(&value_grad, 0);
}

/* For each head, with P the probabilities and G the output gradient:
   dP = G V^T,  dS = P * (dP - rowsum(P * dP)) / sqrt(d),
   dQ += dS K,  dK += dS^T Q,  dV += P^T G.
   Work is split over (image, head) pairs, which share no gradient rows.
   scratch (B,H,d,T) receives each head's values transposed. */
STOCHCA_API void stochca_attention_backward(stochca_real *dq, stochca_real *dk, stochca_real *dv,
                                            stochca_real *dprobs, stochca_real *scratch,
                                            const stochca_real *dout, const stochca_real *probs,
                                            const stochca_real *q, int q_stride,
                                            const stochca_real *k, const stochca_real *v, int kv_stride,
                                            int B, int T, int D, int H)
{
    const int hd = D / H;
    int bh;
    STOCHCA__OMP(omp parallel for schedule(static))
    for (bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const size_t q0 = (size_t)b * T * q_stride + h * hd, kv0 = (size_t)b * T * kv_stride + h * hd;
        stochca__attention_head_backward(dq + q0, dk ? dk + kv0 : NULL, dv ? dv + kv0 : NULL,
                                         dprobs + (size_t)bh * T * T, scratch + (size_t)bh * hd * T,
                                         dout + (size_t)b * T * D + h * hd, probs + (size_t)bh * T * T,
                                         q + q0, q_stride, k + kv0, v + kv0, kv_stride, T, D, hd);
    }
}

/* ---------------------------------------------------------------------------
   GELU and residual */

STOCHCA_API void stochca_gelu_forward(stochca_real *out, const stochca_real *inp, size_t n)
{
    ptrdiff_t i;
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < (ptrdiff_t)n; i++) {
        const stochca_real x = inp[i];
        out[i] = (stochca_real)0.5 * x * (1 + STOCHCA__ERF(x * STOCHCA__INV_SQRT2));
    }
}

/* d/dx [x Phi(x)] = Phi(x) + x phi(x). */
STOCHCA_API void stochca_gelu_backward(stochca_real *dinp, const stochca_real *inp,
                                       const stochca_real *dout, size_t n)
{
    ptrdiff_t i;
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < (ptrdiff_t)n; i++) {
        const stochca_real x = inp[i];
        const stochca_real cdf = (stochca_real)0.5 * (1 + STOCHCA__ERF(x * STOCHCA__INV_SQRT2));
        const stochca_real pdf = STOCHCA__INV_SQRT2PI * STOCHCA__EXP((stochca_real)-0.5 * x * x);
        dinp[i] += dout[i] * (cdf + x * pdf);
    }
}

STOCHCA_API void stochca_residual_forward(stochca_real *out, const stochca_real *a,
                                          const stochca_real *b, size_t n)
{
    ptrdiff_t i;
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < (ptrdiff_t)n; i++)
        out[i] = a[i] + b[i];
}

STOCHCA_API void stochca_residual_backward(stochca_real *da, stochca_real *db,
                                           const stochca_real *dout, size_t n)
{
    ptrdiff_t i;
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < (ptrdiff_t)n; i++) {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

/* ---------------------------------------------------------------------------
   Softmax cross-entropy */

STOCHCA_API stochca_real stochca_crossentropy_forward(stochca_real *losses, stochca_real *probs,
                                                      const stochca_real *logits, const int *labels,
                                                      int B, int K)
{
    double total = 0;
    int b, k;
    for (b = 0; b < B; b++) {
        const stochca_real *z = logits + (size_t)b * K;
        stochca_real *p = probs + (size_t)b * K;
        stochca_real max_logit = z[0], sum = 0;
        for (k = 1; k < K; k++)
            if (z[k] > max_logit) max_logit = z[k];
        for (k = 0; k < K; k++) {
            p[k] = STOCHCA__EXP(z[k] - max_logit);
            sum += p[k];
        }
        for (k = 0; k < K; k++)
            p[k] /= sum;
        /* -log softmax(z)_y = log sum_k exp(z_k - max) - (z_y - max). */
        losses[b] = STOCHCA__LOG(sum) - (z[labels[b]] - max_logit);
        total += losses[b];
    }
    return (stochca_real)(total / B);
}

/* dlogits = (softmax(z) - onehot(y)) / B for the mean over the batch. */
STOCHCA_API void stochca_crossentropy_backward(stochca_real *dlogits, const stochca_real *probs,
                                               const int *labels, int B, int K)
{
    int b, k;
    for (b = 0; b < B; b++)
        for (k = 0; k < K; k++) {
            stochca_real target = k == labels[b] ? 1 : 0;
            dlogits[(size_t)b * K + k] += (probs[(size_t)b * K + k] - target) / (stochca_real)B;
        }
}

/* ---------------------------------------------------------------------------
   Model forward. Equation numbers refer to PAPER_NOTES.md. */

static const stochca_real *stochca__block_input(const stochca_acts *acts, int l)
{
    return l == 0 ? acts->embed : acts->block[l - 1].out;
}

/* LN1 and the input projection; in a cross-attention block only the
   queries (the first D rows of qkv_w), written densely as (B,T,D). */
static void stochca__block_qkv_forward(stochca_model *m, int l, int B, int queries_only)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim, R = B * T;
    const stochca_block *p = &m->params.block[l];
    stochca_block_acts *a = &m->acts.block[l];

    stochca_layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, stochca__block_input(&m->acts, l), D,
                              p->ln1_w, p->ln1_b, R, D);
    stochca_linear_forward(a->qkv, a->ln1, p->qkv_w, p->qkv_b, m->scratch, R, D, queries_only ? D : 3 * D);
}

/* Attention, output projection, residual and MLP of block l. */
static void stochca__block_rest_forward(stochca_model *m, int l, int B, const stochca_kv *kv)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim, M = c->mlp_dim, R = B * T;
    const size_t n = (size_t)R * D;
    const stochca_block *p = &m->params.block[l];
    stochca_block_acts *a = &m->acts.block[l];

    if (m->cross[l])
        stochca_attention_forward(a->attn, a->probs, m->scratch, a->qkv, D, kv->key[l], kv->value[l],
                                  kv->row_stride, B, T, D, c->heads);
    else
        stochca_attention_forward(a->attn, a->probs, m->scratch, a->qkv, 3 * D, a->qkv + D, a->qkv + 2 * D,
                                  3 * D, B, T, D, c->heads);
    stochca_linear_forward(a->proj, a->attn, p->proj_w, p->proj_b, m->scratch, R, D, D);
    stochca_residual_forward(a->resid, stochca__block_input(&m->acts, l), a->proj, n);

    stochca_layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->resid, D, p->ln2_w, p->ln2_b, R, D);
    stochca_linear_forward(a->fc1, a->ln2, p->fc1_w, p->fc1_b, m->scratch, R, D, M);
    stochca_gelu_forward(a->gelu, a->fc1, (size_t)R * M);
    stochca_linear_forward(a->fc2, a->gelu, p->fc2_w, p->fc2_b, m->scratch, R, M, D);
    stochca_residual_forward(a->out, a->resid, a->fc2, n);
}

static void stochca__embed_forward(stochca_model *m, const stochca_real *images, int B)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim, patch = c->channels * c->patch_size * c->patch_size;
    stochca_acts *a = &m->acts;

    stochca_patchify(a->patches, images, B, c->channels, c->image_size, c->patch_size);
    stochca_linear_forward(a->patch_emb, a->patches, m->params.patch_w, m->params.patch_b, m->scratch,
                           B * (T - 1), patch, D);
    stochca_embed_forward(a->embed, a->patch_emb, m->params.class_token, m->params.pos_embed, B, T, D);
}

static void stochca__head_forward(stochca_model *m, const int *labels, int B)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim;
    stochca_acts *a = &m->acts;

    /* Only the class token reaches the head, so LN_f runs on B rows T*D apart. */
    stochca_layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->block[c->depth - 1].out, T * D,
                              m->params.lnf_w, m->params.lnf_b, B, D);
    stochca_linear_forward(a->logits, a->lnf, m->params.head_w, m->params.head_b, m->scratch, B, D,
                           c->classes);
    m->has_loss = labels != NULL;
    if (labels)
        m->loss = stochca_crossentropy_forward(a->losses, a->probs, a->logits, labels, B, c->classes);
}

static int stochca__check_batch(const stochca_model *m, int B, stochca_error *err)
{
    if (!m->act_memory)
        return stochca__fail(err, STOCHCA_ERR_STATE, "no activations: call stochca_model_reserve first");
    if (B < 1 || B > m->batch_capacity)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid batch size %d, expected 1 to %d",
                             B, m->batch_capacity);
    return STOCHCA_OK;
}

static int stochca__check_labels(const stochca_model *m, const int *labels, int B, stochca_error *err)
{
    int b;
    for (b = 0; labels && b < B; b++)
        if (labels[b] < 0 || labels[b] >= m->config.classes)
            return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid label %d for image %d, expected 0 to %d",
                                 labels[b], b, m->config.classes - 1);
    return STOCHCA_OK;
}

static int stochca__check_kv(const stochca_model *m, const unsigned char *cross, const stochca_kv *kv, int B,
                             stochca_error *err)
{
    int l, any = 0;
    for (l = 0; cross && l < m->config.depth; l++)
        any |= cross[l] != 0;
    if (!any)
        return STOCHCA_OK;
    if (!kv)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "cross-attention requested but no pretrained keys "
                             "and values given: run stochca_pretrained_kv first");
    if (kv->batch != B || kv->depth != m->config.depth)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "pretrained keys and values are for %d images and "
                             "%d blocks, but the batch has %d images and the model %d blocks",
                             kv->batch, kv->depth, B, m->config.depth);
    return STOCHCA_OK;
}

STOCHCA_API int stochca_forward(stochca_model *m, const stochca_real *images, const int *labels, int B,
                                const unsigned char *cross, const stochca_kv *kv, stochca_error *err)
{
    int l, status;
    if ((status = stochca__check_batch(m, B, err)) != STOCHCA_OK ||
        (status = stochca__check_labels(m, labels, B, err)) != STOCHCA_OK ||
        (status = stochca__check_kv(m, cross, kv, B, err)) != STOCHCA_OK)
        return status;
    m->batch = B;
    for (l = 0; l < m->config.depth; l++)
        m->cross[l] = cross && cross[l] ? 1 : 0;
    if (kv)
        m->cross_kv = *kv;
    if (labels)
        memcpy(m->labels, labels, (size_t)B * sizeof(int));

    stochca__embed_forward(m, images, B);
    for (l = 0; l < m->config.depth; l++) {
        stochca__block_qkv_forward(m, l, B, m->cross[l]);
        stochca__block_rest_forward(m, l, B, kv);
    }
    stochca__head_forward(m, labels, B);
    return STOCHCA_OK;
}

STOCHCA_API int stochca_pretrained_kv(stochca_model *pretrained, const stochca_real *images, int B,
                                      stochca_kv *kv, stochca_error *err)
{
    const int D = pretrained->config.dim, L = pretrained->config.depth;
    int l, status = stochca__check_batch(pretrained, B, err);
    if (status != STOCHCA_OK)
        return status;
    pretrained->batch = B;
    pretrained->has_loss = 0;
    memset(pretrained->cross, 0, sizeof pretrained->cross);

    /* The last block's attention and MLP do not affect K0 and V0, so they are skipped. */
    stochca__embed_forward(pretrained, images, B);
    for (l = 0; l < L; l++) {
        stochca__block_qkv_forward(pretrained, l, B, 0);
        if (l + 1 < L)
            stochca__block_rest_forward(pretrained, l, B, NULL);
        kv->key[l] = pretrained->acts.block[l].qkv + D;
        kv->value[l] = pretrained->acts.block[l].qkv + 2 * D;
    }
    kv->row_stride = 3 * D;
    kv->batch = B;
    kv->depth = L;
    return STOCHCA_OK;
}

STOCHCA_API void stochca_draw_cross(stochca_rng *rng, float p, int L, unsigned char *cross)
{
    int l;
    for (l = 0; l < L; l++)
        cross[l] = stochca_rng_uniform(rng) < p ? 1 : 0;
}

/* ---------------------------------------------------------------------------
   Cache of pretrained keys and values */

STOCHCA_API double stochca_kv_cache_bytes(const stochca_config *c, int count, int batch_capacity)
{
    const double entry = (double)c->depth * stochca_num_tokens(c) * 2.0 * c->dim * sizeof(stochca_real);
    return entry * ((double)count + batch_capacity) + (double)count;
}

STOCHCA_API int stochca_kv_cache_init(stochca_kv_cache *cache, const stochca_config *c, int count,
                                      int batch_capacity, double budget_bytes, stochca_error *err)
{
    const double bytes = stochca_kv_cache_bytes(c, count, batch_capacity);
    const size_t entry = (size_t)c->depth * (size_t)stochca_num_tokens(c) * 2 * (size_t)c->dim;
    memset(cache, 0, sizeof *cache);
    if (count < 1 || batch_capacity < 1)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid K/V cache size: %d images, batch %d",
                             count, batch_capacity);
    if (bytes > budget_bytes)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "a K/V cache for %d images needs %.0f MiB, more than "
                             "the budget of %.0f MiB", count, bytes / 1048576.0, budget_bytes / 1048576.0);
    if ((double)entry * ((double)count + batch_capacity) > (double)((size_t)-1 / sizeof(stochca_real)))
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "a K/V cache for %d images overflows size_t", count);
    cache->memory = stochca__alloc(entry * (size_t)count);
    cache->batch = stochca__alloc(entry * (size_t)batch_capacity);
    cache->filled = (unsigned char *)STOCHCA_MALLOC((size_t)count);
    if (!cache->memory || !cache->batch || !cache->filled) {
        stochca_kv_cache_free(cache);
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory for a K/V cache of %.0f MiB",
                             bytes / 1048576.0);
    }
    memset(cache->filled, 0, (size_t)count);
    cache->count = count;
    cache->depth = c->depth;
    cache->tokens = stochca_num_tokens(c);
    cache->dim = c->dim;
    cache->batch_capacity = batch_capacity;
    return STOCHCA_OK;
}

STOCHCA_API void stochca_kv_cache_free(stochca_kv_cache *cache)
{
    STOCHCA_FREE(cache->memory);
    STOCHCA_FREE(cache->batch);
    STOCHCA_FREE(cache->filled);
    memset(cache, 0, sizeof *cache);
}

/* Copies image b's K0 and V0 of every block from kv into its cache entry. */
static void stochca__kv_cache_store(stochca_kv_cache *cache, const stochca_kv *kv, int b, int index)
{
    const int T = cache->tokens, D = cache->dim;
    int l, t;
    for (l = 0; l < cache->depth; l++) {
        stochca_real *entry = cache->memory + (((size_t)index * cache->depth + l) * T) * 2 * D;
        for (t = 0; t < T; t++) {
            const size_t row = ((size_t)b * T + t) * kv->row_stride;
            memcpy(entry + (size_t)t * 2 * D, kv->key[l] + row, (size_t)D * sizeof(stochca_real));
            memcpy(entry + (size_t)t * 2 * D + D, kv->value[l] + row, (size_t)D * sizeof(stochca_real));
        }
    }
    cache->filled[index] = 1;
}

STOCHCA_API int stochca_kv_cache_lookup(stochca_kv_cache *cache, stochca_model *pretrained,
                                        const stochca_real *images, const int *indices, int B,
                                        stochca_kv *kv, stochca_error *err)
{
    const int L = cache->depth, T = cache->tokens, D = cache->dim;
    const size_t entry = (size_t)T * 2 * D;
    int b, l, missing = 0;
    if (B < 1 || B > cache->batch_capacity)
        return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid batch size %d for the K/V cache, expected 1 to %d",
                             B, cache->batch_capacity);
    for (b = 0; b < B; b++) {
        if (indices[b] < 0 || indices[b] >= cache->count)
            return stochca__fail(err, STOCHCA_ERR_ARGUMENT, "invalid K/V cache index %d, expected 0 to %d",
                                 indices[b], cache->count - 1);
        missing |= !cache->filled[indices[b]];
    }

    /* A miss computes the whole batch; its fresh K0 and V0 serve this step. */
    if (missing) {
        int status = stochca_pretrained_kv(pretrained, images, B, kv, err);
        if (status != STOCHCA_OK)
            return status;
        for (b = 0; b < B; b++)
            stochca__kv_cache_store(cache, kv, b, indices[b]);
        return STOCHCA_OK;
    }

    /* Gather the entries into (L, B, T, 2D), the layout the attention kernel reads. */
    for (l = 0; l < L; l++) {
        stochca_real *dst = cache->batch + (size_t)l * B * entry;
        for (b = 0; b < B; b++)
            memcpy(dst + (size_t)b * entry, cache->memory + ((size_t)indices[b] * L + l) * entry,
                   entry * sizeof(stochca_real));
        kv->key[l] = dst;
        kv->value[l] = dst + D;
    }
    kv->row_stride = 2 * D;
    kv->batch = B;
    kv->depth = L;
    return STOCHCA_OK;
}

/* ---------------------------------------------------------------------------
   FLOP counts: 2 per multiply-add of every matrix product. */

/* Per image: the patch projection, the head, and per block the in_proj
   (q_rows of its 3D rows), the attention products, out_proj and the MLP. */
static double stochca__flops_blocks(const stochca_config *c, const unsigned char *cross, int backward)
{
    const double T = stochca_num_tokens(c), D = c->dim, M = c->mlp_dim;
    double total = 0;
    int l;
    for (l = 0; l < c->depth; l++) {
        const int is_cross = cross && cross[l];
        const double qkv = 2 * T * D * (is_cross ? D : 3 * D);
        const double attention = 2 * 2 * T * T * D;            /* scores and probabilities times values */
        const double dense = 2 * T * D * D + 2 * 2 * T * D * M; /* out_proj, fc1, fc2 */
        total += qkv + attention + dense;
        if (backward) {
            total += 2 * (qkv + dense);                          /* input and weight gradients */
            total += is_cross ? attention : 2 * attention;       /* dP, dQ; plus dK, dV in self-attention */
        }
    }
    return total;
}

STOCHCA_API double stochca_flops_forward(const stochca_config *c)
{
    const double N = stochca_num_tokens(c) - 1, D = c->dim;
    const double patch = (double)c->channels * c->patch_size * c->patch_size;
    return 2 * N * patch * D + stochca__flops_blocks(c, NULL, 0) + 2 * D * c->classes;
}

STOCHCA_API double stochca_flops_train_step(const stochca_config *c, const unsigned char *cross, int with_pretrained)
{
    const double N = stochca_num_tokens(c) - 1, T = N + 1, D = c->dim;
    const double patch = (double)c->channels * c->patch_size * c->patch_size;
    /* The patch projection has no input gradient; the head has both. */
    double flops = 2 * 2 * N * patch * D + stochca__flops_blocks(c, cross, 1) + 3 * 2 * D * c->classes;
    if (with_pretrained) {
        /* The pretrained forward stops after the last block's in_proj. */
        stochca_config shorter = *c;
        shorter.depth = c->depth - 1;
        flops += 2 * N * patch * D + stochca__flops_blocks(&shorter, NULL, 0) + 2 * T * D * 3 * D;
    }
    return flops;
}

/* ---------------------------------------------------------------------------
   Model backward: the forward in reverse, each step adding into gradients. */

STOCHCA_API void stochca_zero_grad(stochca_model *m)
{
    if (m->grad_memory)
        memset(m->grad_memory, 0, m->num_params * sizeof(stochca_real));
}

static void stochca__head_backward(stochca_model *m, const int *labels, int B)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim;
    const stochca_acts *a = &m->acts;
    stochca_acts *g = &m->grad_acts;

    stochca_crossentropy_backward(g->logits, a->probs, labels, B, c->classes);
    stochca_linear_backward(g->lnf, m->grads.head_w, m->grads.head_b, g->logits, a->lnf, m->params.head_w,
                            B, D, c->classes);
    stochca_layernorm_backward(g->block[c->depth - 1].out, m->grads.lnf_w, m->grads.lnf_b, g->lnf,
                               a->block[c->depth - 1].out, T * D, m->params.lnf_w, a->lnf_mean, a->lnf_rstd,
                               B, D);
}

/* Backward of block l, from g->block[l].out to the gradient of its input. */
static void stochca__block_backward(stochca_model *m, int l, int B)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim, M = c->mlp_dim, R = B * T;
    const size_t n = (size_t)R * D;
    const stochca_block *p = &m->params.block[l];
    stochca_block *dp = &m->grads.block[l];
    const stochca_block_acts *a = &m->acts.block[l];
    stochca_block_acts *g = &m->grad_acts.block[l];
    const stochca_real *x = stochca__block_input(&m->acts, l);
    stochca_real *dx = l == 0 ? m->grad_acts.embed : m->grad_acts.block[l - 1].out;

    /* z_out = resid + fc2(gelu(fc1(LN2(resid)))) */
    stochca_residual_backward(g->resid, g->fc2, g->out, n);
    stochca_linear_backward(g->gelu, dp->fc2_w, dp->fc2_b, g->fc2, a->gelu, p->fc2_w, R, M, D);
    stochca_gelu_backward(g->fc1, a->fc1, g->gelu, (size_t)R * M);
    stochca_linear_backward(g->ln2, dp->fc1_w, dp->fc1_b, g->fc1, a->ln2, p->fc1_w, R, D, M);
    stochca_layernorm_backward(g->resid, dp->ln2_w, dp->ln2_b, g->ln2, a->resid, D, p->ln2_w,
                               a->ln2_mean, a->ln2_rstd, R, D);

    /* resid = x + proj(attention(q, k, v)) */
    stochca_residual_backward(dx, g->proj, g->resid, n);
    stochca_linear_backward(g->attn, dp->proj_w, dp->proj_b, g->proj, a->attn, p->proj_w, R, D, D);
    if (m->cross[l]) {
        /* K0 and V0 belong to the frozen pretrained model, so only dQ is
           needed and only the query rows of qkv_w and qkv_b get gradient. */
        stochca_attention_backward(g->qkv, NULL, NULL, g->probs, m->scratch, g->attn, a->probs, a->qkv, D,
                                   m->cross_kv.key[l], m->cross_kv.value[l], m->cross_kv.row_stride,
                                   B, T, D, c->heads);
        stochca_linear_backward(g->ln1, dp->qkv_w, dp->qkv_b, g->qkv, a->ln1, p->qkv_w, R, D, D);
    } else {
        stochca_attention_backward(g->qkv, g->qkv + D, g->qkv + 2 * D, g->probs, m->scratch, g->attn,
                                   a->probs, a->qkv, 3 * D, a->qkv + D, a->qkv + 2 * D, 3 * D, B, T, D,
                                   c->heads);
        stochca_linear_backward(g->ln1, dp->qkv_w, dp->qkv_b, g->qkv, a->ln1, p->qkv_w, R, D, 3 * D);
    }
    stochca_layernorm_backward(dx, dp->ln1_w, dp->ln1_b, g->ln1, x, D, p->ln1_w, a->ln1_mean, a->ln1_rstd,
                               R, D);
}

static void stochca__embed_backward(stochca_model *m, int B)
{
    const stochca_config *c = &m->config;
    const int T = stochca_num_tokens(c), D = c->dim, patch = c->channels * c->patch_size * c->patch_size;
    stochca_acts *g = &m->grad_acts;

    stochca_embed_backward(g->patch_emb, m->grads.class_token, m->grads.pos_embed, g->embed, B, T, D);
    stochca_linear_backward(NULL, m->grads.patch_w, m->grads.patch_b, g->patch_emb, m->acts.patches,
                            m->params.patch_w, B * (T - 1), patch, D);
}

/* Zeroes x in chunks split over threads, because the activation gradients are large. */
static void stochca__zero(stochca_real *x, size_t n)
{
    const ptrdiff_t chunk = (ptrdiff_t)1 << 16, total = (ptrdiff_t)n;
    ptrdiff_t i;
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < total; i += chunk)
        memset(x + i, 0, (size_t)(total - i < chunk ? total - i : chunk) * sizeof *x);
}

STOCHCA_API int stochca_backward(stochca_model *m, stochca_error *err)
{
    int l;
    if (!m->grad_memory)
        return stochca__fail(err, STOCHCA_ERR_STATE, "no gradient buffers: call stochca_model_reserve "
                             "with training = 1");
    if (!m->has_loss)
        return stochca__fail(err, STOCHCA_ERR_STATE, "backward needs a forward with labels first");
    stochca__zero(m->grad_act_memory, m->num_acts);

    stochca__head_backward(m, m->labels, m->batch);
    for (l = m->config.depth - 1; l >= 0; l--)
        stochca__block_backward(m, l, m->batch);
    stochca__embed_backward(m, m->batch);
    return STOCHCA_OK;
}

/* ---------------------------------------------------------------------------
   AdamW, learning-rate schedule, L2-SP */

STOCHCA_API stochca_adamw stochca_adamw_default(void)
{
    stochca_adamw opt;
    opt.lr = 5e-4f;
    opt.head_lr_scale = 1.0f;
    opt.beta1 = 0.9f;
    opt.beta2 = 0.999f;
    opt.eps = 1e-8f;
    opt.weight_decay = 0.05f;
    opt.decay_head_only = 0;
    return opt;
}

/* Number of backbone parameters: everything before heads.head.weight. */
static size_t stochca__backbone_size(const stochca_model *m)
{
    return (size_t)(m->params.head_w - m->param_memory);
}

/* theta <- theta - lr * wd * theta (decoupled decay), then
   m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
   theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). */
STOCHCA_API void stochca_adamw_update(stochca_model *m, const stochca_adamw *opt)
{
    const size_t backbone = stochca__backbone_size(m), n = m->num_params;
    stochca_real *first = m->adam_memory, *second = m->adam_memory + n;
    double correction1, correction2;
    long i;

    m->adam_step += 1;
    correction1 = 1.0 - pow((double)opt->beta1, (double)m->adam_step);
    correction2 = 1.0 - pow((double)opt->beta2, (double)m->adam_step);
    STOCHCA__OMP(omp parallel for)
    for (i = 0; i < (long)n; i++) {
        const int is_head = (size_t)i >= backbone;
        const stochca_real lr = (stochca_real)(is_head ? opt->lr * opt->head_lr_scale : opt->lr);
        const stochca_real decay = (stochca_real)(is_head || !opt->decay_head_only ? opt->weight_decay : 0);
        const stochca_real g = m->grad_memory[i];
        stochca_real m_hat, v_hat;

        m->param_memory[i] -= lr * decay * m->param_memory[i];
        first[i] = opt->beta1 * first[i] + (1 - opt->beta1) * g;
        second[i] = opt->beta2 * second[i] + (1 - opt->beta2) * g * g;
        m_hat = (stochca_real)(first[i] / correction1);
        v_hat = (stochca_real)(second[i] / correction2);
        m->param_memory[i] -= lr * m_hat / (STOCHCA__SQRT(v_hat) + opt->eps);
    }
}

STOCHCA_API float stochca_cosine_lr(float base, long t, long warmup, long total)
{
    const double pi = 3.14159265358979323846;
    double progress;
    if (t < warmup)
        return base * (float)(t + 1) / (float)warmup;
    if (total <= warmup)
        return base;
    progress = (double)(t - warmup) / (double)(total - warmup);
    if (progress > 1.0)
        progress = 1.0;
    return (float)(0.5 * base * (1.0 + cos(pi * progress)));
}

STOCHCA_API double stochca_l2sp(stochca_model *m, const stochca_model *pretrained, float alpha)
{
    const size_t backbone = stochca__backbone_size(m);
    double penalty = 0;
    size_t i;
    for (i = 0; i < backbone; i++) {
        const stochca_real diff = m->param_memory[i] - pretrained->param_memory[i];
        m->grad_memory[i] += alpha * diff;
        penalty += (double)diff * diff;
    }
    return 0.5 * alpha * penalty;
}

STOCHCA_API double stochca_grad_norm(const stochca_model *m)
{
    double sum = 0;
    size_t i;
    for (i = 0; i < m->num_params; i++)
        sum += (double)m->grad_memory[i] * m->grad_memory[i];
    return sqrt(sum);
}

/* ---------------------------------------------------------------------------
   Checkpoints: float32 little-endian whatever the host's byte order. */

#define STOCHCA__IO_CHUNK 4096

static void stochca__put_u32(unsigned char *dst, uint32_t x)
{
    dst[0] = (unsigned char)(x & 0xFF);
    dst[1] = (unsigned char)((x >> 8) & 0xFF);
    dst[2] = (unsigned char)((x >> 16) & 0xFF);
    dst[3] = (unsigned char)((x >> 24) & 0xFF);
}

static uint32_t stochca__get_u32(const unsigned char *src)
{
    return (uint32_t)src[0] | ((uint32_t)src[1] << 8) | ((uint32_t)src[2] << 16) | ((uint32_t)src[3] << 24);
}

static int stochca__write_floats(FILE *f, const stochca_real *x, size_t n)
{
    unsigned char bytes[4 * STOCHCA__IO_CHUNK];
    size_t done = 0;
    while (done < n) {
        size_t count = n - done < STOCHCA__IO_CHUNK ? n - done : STOCHCA__IO_CHUNK, i;
        for (i = 0; i < count; i++) {
            float value = (float)x[done + i];
            uint32_t bits;
            memcpy(&bits, &value, 4);
            stochca__put_u32(bytes + 4 * i, bits);
        }
        if (fwrite(bytes, 4, count, f) != count)
            return 0;
        done += count;
    }
    return 1;
}

static int stochca__read_floats(FILE *f, stochca_real *x, size_t n)
{
    unsigned char bytes[4 * STOCHCA__IO_CHUNK];
    size_t done = 0;
    while (done < n) {
        size_t count = n - done < STOCHCA__IO_CHUNK ? n - done : STOCHCA__IO_CHUNK, i;
        if (fread(bytes, 4, count, f) != count)
            return 0;
        for (i = 0; i < count; i++) {
            uint32_t bits = stochca__get_u32(bytes + 4 * i);
            float value;
            memcpy(&value, &bits, 4);
            x[done + i] = (stochca_real)value;
        }
        done += count;
    }
    return 1;
}

static void stochca__config_words(const stochca_config *c, uint32_t *words)
{
    words[0] = (uint32_t)c->image_size;
    words[1] = (uint32_t)c->channels;
    words[2] = (uint32_t)c->patch_size;
    words[3] = (uint32_t)c->dim;
    words[4] = (uint32_t)c->depth;
    words[5] = (uint32_t)c->heads;
    words[6] = (uint32_t)c->mlp_dim;
    words[7] = (uint32_t)c->classes;
}

static int stochca__write_checkpoint(FILE *f, const stochca_model *m, const stochca_rng *rng, int with_optimizer)
{
    unsigned char header[4 * STOCHCA_CHECKPOINT_HEADER_WORDS];
    uint32_t words[STOCHCA_CHECKPOINT_HEADER_WORDS];
    uint64_t state = rng ? rng->state : 0;
    int i;
    memset(words, 0, sizeof words);
    words[0] = STOCHCA_CHECKPOINT_MAGIC;
    words[1] = STOCHCA_CHECKPOINT_VERSION;
    stochca__config_words(&m->config, words + 2);
    words[10] = (uint32_t)m->num_params;
    words[11] = with_optimizer ? 1u : 0u;
    words[12] = (uint32_t)m->adam_step;
    words[13] = (uint32_t)(state & 0xFFFFFFFFu);
    words[14] = (uint32_t)(state >> 32);
    for (i = 0; i < STOCHCA_CHECKPOINT_HEADER_WORDS; i++)
        stochca__put_u32(header + 4 * i, words[i]);
    if (fwrite(header, 1, sizeof header, f) != sizeof header)
        return 0;
    if (!stochca__write_floats(f, m->param_memory, m->num_params))
        return 0;
    return !with_optimizer || stochca__write_floats(f, m->adam_memory, 2 * m->num_params);
}

STOCHCA_API int stochca_checkpoint_save(const stochca_model *m, const stochca_rng *rng, const char *path,
                                        int with_optimizer, stochca_error *err)
{
    size_t length = strlen(path);
    char *tmp_path;
    FILE *f;
    int written;
    if (with_optimizer && !m->adam_memory)
        return stochca__fail(err, STOCHCA_ERR_STATE, "cannot save AdamW state of '%s': the model has no "
                             "moments (reserve it with training = 1)", path);
    if (m->num_params > 0xFFFFFFFFu)
        return stochca__fail(err, STOCHCA_ERR_CONFIG, "cannot save '%s': %zu parameters exceed the "
                             "format's 32-bit count", path, m->num_params);
    tmp_path = (char *)STOCHCA_MALLOC(length + 5);
    if (!tmp_path)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory for a file name");
    memcpy(tmp_path, path, length);
    memcpy(tmp_path + length, ".tmp", 5);

    f = fopen(tmp_path, "wb");
    if (!f) {
        stochca__fail(err, STOCHCA_ERR_IO, "cannot create '%s'; check that the folder exists and is writable",
                      tmp_path);
        STOCHCA_FREE(tmp_path);
        return STOCHCA_ERR_IO;
    }
    written = stochca__write_checkpoint(f, m, rng, with_optimizer);
    written = fclose(f) == 0 && written;
    if (!written || rename(tmp_path, path) != 0) {
        remove(tmp_path);
        stochca__fail(err, STOCHCA_ERR_IO, "writing checkpoint '%s' failed (disk full or not writable); "
                      "any earlier file at that path is unchanged", path);
        STOCHCA_FREE(tmp_path);
        return STOCHCA_ERR_IO;
    }
    STOCHCA_FREE(tmp_path);
    return STOCHCA_OK;
}

/* Reads and checks the header words; fills c and returns the status. */
static int stochca__read_header(FILE *f, const char *path, uint32_t *words, stochca_config *c, stochca_error *err)
{
    unsigned char header[4 * STOCHCA_CHECKPOINT_HEADER_WORDS];
    stochca_error config_err;
    int i;
    if (fread(header, 1, sizeof header, f) != sizeof header)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is truncated: shorter than its "
                             "%d-byte header", path, (int)sizeof header);
    for (i = 0; i < STOCHCA_CHECKPOINT_HEADER_WORDS; i++)
        words[i] = stochca__get_u32(header + 4 * i);
    if (words[0] != STOCHCA_CHECKPOINT_MAGIC)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "'%s' is not a stochca checkpoint: bad magic 0x%08lx, "
                             "expected 0x%08lx (\"STCA\")", path, (unsigned long)words[0],
                             (unsigned long)STOCHCA_CHECKPOINT_MAGIC);
    if (words[1] != STOCHCA_CHECKPOINT_VERSION)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' has format version %lu, but this "
                             "build reads version %u", path, (unsigned long)words[1], STOCHCA_CHECKPOINT_VERSION);
    for (i = 2; i < 10; i++)
        if (words[i] > STOCHCA__MAX_SIZE)
            return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is corrupt: configuration word %d "
                                 "is %lu", path, i, (unsigned long)words[i]);
    c->image_size = (int)words[2];
    c->channels = (int)words[3];
    c->patch_size = (int)words[4];
    c->dim = (int)words[5];
    c->depth = (int)words[6];
    c->heads = (int)words[7];
    c->mlp_dim = (int)words[8];
    c->classes = (int)words[9];
    if (stochca_config_validate(c, &config_err) != STOCHCA_OK)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is corrupt: %s", path, config_err.message);
    if (words[10] != (uint32_t)stochca__layout_params(c, NULL, NULL))
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is corrupt: it declares %lu parameters, "
                             "its configuration needs %zu", path, (unsigned long)words[10],
                             stochca__layout_params(c, NULL, NULL));
    if (words[11] > 1u)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is corrupt: unknown flags 0x%lx",
                             path, (unsigned long)words[11]);
    return STOCHCA_OK;
}

STOCHCA_API int stochca_checkpoint_read_config(const char *path, stochca_config *c, stochca_error *err)
{
    uint32_t words[STOCHCA_CHECKPOINT_HEADER_WORDS];
    FILE *f = fopen(path, "rb");
    int status;
    if (!f)
        return stochca__fail(err, STOCHCA_ERR_IO, "cannot open checkpoint '%s'; check the path", path);
    status = stochca__read_header(f, path, words, c, err);
    fclose(f);
    return status;
}

/* Names the first configuration field where a and b differ. */
static int stochca__compare_config(const stochca_config *file, const stochca_config *model, const char *path,
                                   stochca_error *err)
{
    uint32_t a[8], b[8];
    static const char *const names[8] = {"image_size", "channels", "patch_size", "dim",
                                         "depth", "heads", "mlp_dim", "classes"};
    int i;
    stochca__config_words(file, a);
    stochca__config_words(model, b);
    for (i = 0; i < 8; i++)
        if (a[i] != b[i])
            return stochca__fail(err, STOCHCA_ERR_CONFIG, "checkpoint '%s' does not match the model: %s is %lu "
                                 "in the file but %lu in the model", path, names[i],
                                 (unsigned long)a[i], (unsigned long)b[i]);
    return STOCHCA_OK;
}

/* Checks that the file contains exactly the header and `floats` values. */
static int stochca__check_size(FILE *f, const char *path, size_t floats, stochca_error *err)
{
    const long header = 4L * STOCHCA_CHECKPOINT_HEADER_WORDS;
    long actual, expected = header + 4L * (long)floats;
    if (fseek(f, 0, SEEK_END) != 0 || (actual = ftell(f)) < 0 || fseek(f, header, SEEK_SET) != 0)
        return stochca__fail(err, STOCHCA_ERR_IO, "cannot determine the size of checkpoint '%s'", path);
    if (actual < expected)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is truncated: %ld bytes, expected %ld",
                             path, actual, expected);
    if (actual > expected)
        return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' has %ld bytes, expected %ld: trailing "
                             "data after the last tensor", path, actual, expected);
    return STOCHCA_OK;
}

static int stochca__load_body(FILE *f, stochca_model *m, stochca_rng *rng, const uint32_t *words,
                              const char *path, stochca_error *err)
{
    const size_t n = m->num_params;
    const int has_optimizer = (words[11] & 1u) != 0;
    const size_t floats = has_optimizer ? 3 * n : n;
    stochca_real *buffer;
    size_t i;
    int status = stochca__check_size(f, path, floats, err);
    if (status != STOCHCA_OK)
        return status;
    buffer = stochca__alloc(floats);
    if (!buffer)
        return stochca__fail(err, STOCHCA_ERR_NOMEM, "out of memory while loading '%s'", path);
    if (!stochca__read_floats(f, buffer, floats)) {
        STOCHCA_FREE(buffer);
        return stochca__fail(err, STOCHCA_ERR_IO, "reading checkpoint '%s' failed", path);
    }
    for (i = 0; i < floats; i++)
        if (!isfinite(buffer[i])) {
            STOCHCA_FREE(buffer);
            return stochca__fail(err, STOCHCA_ERR_FORMAT, "checkpoint '%s' is corrupt: value %zu is not finite",
                                 path, i);
        }
    /* Only now, with every check passed, is the model changed. */
    memcpy(m->param_memory, buffer, n * sizeof(stochca_real));
    if (has_optimizer && m->adam_memory) {
        memcpy(m->adam_memory, buffer + n, 2 * n * sizeof(stochca_real));
        m->adam_step = (long)words[12];
        if (rng)
            rng->state = (uint64_t)words[13] | ((uint64_t)words[14] << 32);
    }
    STOCHCA_FREE(buffer);
    return STOCHCA_OK;
}

STOCHCA_API int stochca_checkpoint_load(stochca_model *m, stochca_rng *rng, const char *path,
                                        stochca_error *err)
{
    uint32_t words[STOCHCA_CHECKPOINT_HEADER_WORDS];
    stochca_config c;
    FILE *f = fopen(path, "rb");
    int status;
    if (!f)
        return stochca__fail(err, STOCHCA_ERR_IO, "cannot open checkpoint '%s'; check the path", path);
    status = stochca__read_header(f, path, words, &c, err);
    if (status == STOCHCA_OK)
        status = stochca__compare_config(&c, &m->config, path, err);
    if (status == STOCHCA_OK)
        status = stochca__load_body(f, m, rng, words, path, err);
    fclose(f);
    return status;
}

#ifdef __cplusplus
}
#endif
#endif /* STOCHCA_IMPLEMENTATION_DONE */
#endif /* STOCHCA_IMPLEMENTATION */

/*
   LICENSE

   MIT License. Copyright (c) 2026 the stochca authors.

   Permission is hereby granted, free of charge, to any person obtaining a
   copy of this software and associated documentation files (the
   "Software"), to deal in the Software without restriction, including
   without limitation the rights to use, copy, modify, merge, publish,
   distribute, sublicense, and/or sell copies of the Software, and to permit
   persons to whom the Software is furnished to do so, subject to the
   following conditions:

   The above copyright notice and this permission notice shall be included
   in all copies or substantial portions of the Software.

   THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
   OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
   MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN
   NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
   DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
   OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
   USE OR OTHER DEALINGS IN THE SOFTWARE.
*/
