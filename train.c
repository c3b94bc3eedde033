/* train.c - the driver: reads IDX data, pretrains a ViT on Fashion-MNIST,
   fine-tunes it on MNIST with plain fine-tuning or StochCA, and runs the
   main job. Run `./train --help` for the commands and flags. */
#ifndef STOCHCA_IMPLEMENTATION
#define STOCHCA_IMPLEMENTATION
#endif
#include "stochca.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __unix__
#include <sys/resource.h>  /* getrusage, for the benchmark's peak memory */
#endif

#define DATA_CLASSES 10
#define IDX_IMAGES_MAGIC 0x00000803u
#define IDX_LABELS_MAGIC 0x00000801u
#define IDX_MAX_DIMENSION 100000000u
#define PIXEL_MEAN 0.5f   /* inputs are mapped from [0, 255] to [-1, 1] */
#define PIXEL_STD 0.5f

/* ---------------------------------------------------------------------------
   IDX files (the MNIST format): big-endian header, then unsigned bytes. */

typedef struct {
    int count;              /* number of images */
    int rows, cols;
    unsigned char *pixels;  /* (count, rows, cols) */
    unsigned char *labels;  /* (count), each in [0, DATA_CLASSES) */
} dataset;

static uint32_t read_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* Reads a whole file into memory. Returns NULL and writes a message on failure. */
static unsigned char *read_file(const char *path, long *size, char *msg, size_t msg_size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *bytes;
    if (!f) {
        snprintf(msg, msg_size, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (*size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        snprintf(msg, msg_size, "cannot determine the size of '%s'", path);
        fclose(f);
        return NULL;
    }
    bytes = (unsigned char *)malloc(*size > 0 ? (size_t)*size : 1);
    if (!bytes || fread(bytes, 1, (size_t)*size, f) != (size_t)*size) {
        snprintf(msg, msg_size, bytes ? "reading '%s' failed" : "out of memory reading '%s'", path);
        free(bytes);
        fclose(f);
        return NULL;
    }
    fclose(f);
    return bytes;
}

/* Checks the IDX header of `bytes`: magic, dimensions and exact size.
   Fills dims[0..ndim-1]. Returns 0 and writes a message on failure. */
static int parse_idx_header(const unsigned char *bytes, long size, const char *path, uint32_t magic,
                            int ndim, uint32_t *dims, char *msg, size_t msg_size)
{
    const long header = 4L + 4L * ndim;
    uint64_t payload = 1;
    int k;
    if (size >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b) {
        snprintf(msg, msg_size, "'%s' is gzip-compressed; decompress it first (gunzip -k '%s')", path, path);
        return 0;
    }
    if (size < header) {
        snprintf(msg, msg_size, "'%s' is truncated: %ld bytes, shorter than its %ld-byte IDX header",
                 path, size, header);
        return 0;
    }
    if (read_be32(bytes) != magic) {
        snprintf(msg, msg_size, "'%s' has IDX magic number 0x%08lx, expected 0x%08lx (%s)", path,
                 (unsigned long)read_be32(bytes), (unsigned long)magic,
                 magic == IDX_IMAGES_MAGIC ? "unsigned-byte images, 3 dimensions" : "unsigned-byte labels, 1 dimension");
        return 0;
    }
    for (k = 0; k < ndim; k++) {
        dims[k] = read_be32(bytes + 4 + 4 * k);
        if (dims[k] == 0 || dims[k] > IDX_MAX_DIMENSION) {
            snprintf(msg, msg_size, "'%s' is corrupt: dimension %d is %lu, expected 1 to %lu", path, k,
                     (unsigned long)dims[k], (unsigned long)IDX_MAX_DIMENSION);
            return 0;
        }
        payload *= dims[k];  /* at most 1e8^3 < 2^64 */
    }
    if (payload != (uint64_t)(size - header)) {
        snprintf(msg, msg_size, "'%s' %s: %ld bytes, but its header describes %.0f", path,
                 payload > (uint64_t)(size - header) ? "is truncated" : "has trailing data", size,
                 (double)payload + (double)header);
        return 0;
    }
    return 1;
}

static void free_dataset(dataset *d)
{
    free(d->pixels);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

/* Parses an image file and a label file, already in memory, that must
   describe the same images, each side image_size pixels, labels in
   [0, DATA_CLASSES). The paths only name the files in messages. */
static int parse_dataset(dataset *d, const unsigned char *images, long image_bytes, const char *images_path,
                         const unsigned char *labels, long label_bytes, const char *labels_path, int image_size,
                         char *msg, size_t msg_size)
{
    uint32_t image_dims[3], label_dims[1], i;

    memset(d, 0, sizeof *d);
    if (!parse_idx_header(images, image_bytes, images_path, IDX_IMAGES_MAGIC, 3, image_dims, msg, msg_size) ||
        !parse_idx_header(labels, label_bytes, labels_path, IDX_LABELS_MAGIC, 1, label_dims, msg, msg_size))
        return 0;
    if (image_dims[1] != (uint32_t)image_size || image_dims[2] != (uint32_t)image_size) {
        snprintf(msg, msg_size, "'%s' contains %lux%lu images, but the model expects %dx%d", images_path,
                 (unsigned long)image_dims[1], (unsigned long)image_dims[2], image_size, image_size);
        return 0;
    }
    if (image_dims[0] != label_dims[0]) {
        snprintf(msg, msg_size, "'%s' contains %lu images but '%s' contains %lu labels; the counts must match",
                 images_path, (unsigned long)image_dims[0], labels_path, (unsigned long)label_dims[0]);
        return 0;
    }
    for (i = 0; i < label_dims[0]; i++)
        if (labels[8 + i] >= DATA_CLASSES) {
            snprintf(msg, msg_size, "'%s': label %d of image %lu is out of range, expected 0 to %d",
                     labels_path, labels[8 + i], (unsigned long)i, DATA_CLASSES - 1);
            return 0;
        }

    d->count = (int)image_dims[0];
    d->rows = d->cols = image_size;
    d->pixels = (unsigned char *)malloc((size_t)d->count * image_size * image_size);
    d->labels = (unsigned char *)malloc((size_t)d->count);
    if (!d->pixels || !d->labels) {
        snprintf(msg, msg_size, "out of memory for %d images of '%s'", d->count, images_path);
        free_dataset(d);
        return 0;
    }
    memcpy(d->pixels, images + 16, (size_t)d->count * image_size * image_size);
    memcpy(d->labels, labels + 8, (size_t)d->count);
    return 1;
}

/* Loads an image file and its label file; see parse_dataset. */
static int load_dataset(dataset *d, const char *images_path, const char *labels_path, int image_size,
                        char *msg, size_t msg_size)
{
    long image_bytes = 0, label_bytes = 0;
    unsigned char *images, *labels = NULL;
    int ok = 0;

    memset(d, 0, sizeof *d);
    images = read_file(images_path, &image_bytes, msg, msg_size);
    if (images)
        labels = read_file(labels_path, &label_bytes, msg, msg_size);
    if (images && labels)
        ok = parse_dataset(d, images, image_bytes, images_path, labels, label_bytes, labels_path, image_size,
                           msg, msg_size);
    free(images);
    free(labels);
    return ok;
}

/* ---------------------------------------------------------------------------
   Subsets and batches */

/* Shuffles x[0..n-1] in place (Fisher-Yates). */
static void shuffle_indices(int *x, int n, stochca_rng *rng)
{
    int i;
    for (i = n - 1; i > 0; i--) {
        int j = (int)(stochca_rng_next(rng) % (uint64_t)(i + 1)), swap = x[i];
        x[i] = x[j];
        x[j] = swap;
    }
}

/* Splits the images members[0..count-1] of d class by class. One
   generator seeded with `seed` shuffles the n_c members of each class c,
   in class order 0 to 9. The first round(fraction * n_c) of them, and at
   least 1 when n_c > 0, go to picked. The others go to rest unless rest is
   NULL. picked and rest need room for count indices. Returns 0 on
   allocation failure. */
static int split_by_class(const dataset *d, const int *members, int count, double fraction, uint64_t seed,
                          int *picked, int *picked_count, int *rest, int *rest_count)
{
    int *class_members = (int *)malloc((size_t)(count > 0 ? count : 1) * sizeof(int));
    int c, i;
    stochca_rng rng;

    if (!class_members)
        return 0;
    *picked_count = 0;
    if (rest_count)
        *rest_count = 0;
    stochca_rng_seed(&rng, seed);
    for (c = 0; c < DATA_CLASSES; c++) {
        int n = 0, keep;
        for (i = 0; i < count; i++)
            if (d->labels[members[i]] == c)
                class_members[n++] = members[i];
        shuffle_indices(class_members, n, &rng);
        keep = (int)floor(fraction * n + 0.5);
        if (keep < 1 && n > 0)
            keep = 1;
        for (i = 0; i < n; i++) {
            if (i < keep)
                picked[(*picked_count)++] = class_members[i];
            else if (rest)
                rest[(*rest_count)++] = class_members[i];
        }
    }
    free(class_members);
    return 1;
}

/* Returns a new array 0, 1, ..., count - 1, or NULL if out of memory. */
static int *identity_indices(int count)
{
    int *x = (int *)malloc((size_t)(count > 0 ? count : 1) * sizeof(int));
    int i;
    if (x)
        for (i = 0; i < count; i++)
            x[i] = i;
    return x;
}

/* Copies images indices[0..count-1] of src, in that order, into a new
   dataset dst. Returns 0 on allocation failure, with dst empty. */
static int gather_images(const dataset *src, const int *indices, int count, dataset *dst)
{
    const size_t image = (size_t)src->rows * src->cols;
    int i;

    memset(dst, 0, sizeof *dst);
    dst->rows = src->rows;
    dst->cols = src->cols;
    dst->pixels = (unsigned char *)malloc((size_t)(count > 0 ? count : 1) * image);
    dst->labels = (unsigned char *)malloc((size_t)(count > 0 ? count : 1));
    if (!dst->pixels || !dst->labels) {
        free_dataset(dst);
        return 0;
    }
    for (i = 0; i < count; i++) {
        memcpy(dst->pixels + (size_t)i * image, src->pixels + (size_t)indices[i] * image, image);
        dst->labels[i] = src->labels[indices[i]];
    }
    dst->count = count;
    return 1;
}

/* Picks round(ratio * n_c) images (at least 1) of every class c, chosen by
   a seeded shuffle within the class, so the subset is stratified and fixed
   per seed. The shuffle does not depend on the ratio, so for one seed a
   smaller ratio gives a subset of a larger one. Returns 0 on allocation
   failure. */
static int make_subset(const dataset *src, double ratio, uint64_t seed, dataset *dst)
{
    int *all = identity_indices(src->count);
    int *picked = (int *)malloc((size_t)(src->count > 0 ? src->count : 1) * sizeof(int));
    int count = 0, ok;

    memset(dst, 0, sizeof *dst);
    ok = all && picked &&
         split_by_class(src, all, src->count, ratio, seed * 1000003u + 17u, picked, &count, NULL, NULL) &&
         gather_images(src, picked, count, dst);
    free(all);
    free(picked);
    return ok;
}

/* The order of images in epoch `epoch`: a shuffle seeded by (seed, epoch),
   so a run can be resumed at any step without storing the order. */
static void epoch_order(int *order, int count, uint64_t seed, long epoch)
{
    stochca_rng rng;
    int i;
    stochca_rng_seed(&rng, seed ^ (0x5DEECE66Dull * (uint64_t)(epoch + 1)));
    for (i = 0; i < count; i++)
        order[i] = i;
    for (i = count - 1; i > 0; i--) {
        int j = (int)(stochca_rng_next(&rng) % (uint64_t)(i + 1)), swap = order[i];
        order[i] = order[j];
        order[j] = swap;
    }
}

/* Converts images order[0..B-1] of d to floats (B,1,S,S) in [-1, 1]. */
static void fill_batch(const dataset *d, const int *order, int B, stochca_real *images, int *labels)
{
    const size_t image = (size_t)d->rows * d->cols;
    int b;
    size_t i;
    for (b = 0; b < B; b++) {
        const unsigned char *src = d->pixels + (size_t)order[b] * image;
        for (i = 0; i < image; i++)
            images[(size_t)b * image + i] = ((stochca_real)src[i] / 255 - PIXEL_MEAN) / PIXEL_STD;
        labels[b] = d->labels[order[b]];
    }
}

/* ---------------------------------------------------------------------------
   Command-line options */

typedef enum { METHOD_FT, METHOD_STOCHCA, METHOD_L2SP, METHOD_STOCHCA_L2SP } method_kind;

static const char *const method_names[4] = {"ft", "stochca", "l2sp", "stochca+l2sp"};

typedef struct {
    method_kind method;
    double p;             /* StochCA cross-attention probability */
    double ratio;         /* fraction of the training split used */
    double lr;            /* peak learning rate */
    double wd;            /* AdamW weight decay */
    double head_lr_scale;
    double l2sp_alpha;
    long epochs;
    long steps;           /* overrides epochs when > 0 */
    long warmup;
    int batch;
    long seed;
    int threads;
    stochca_config config;  /* model shape for pretraining */
    const char *data_dir;
    const char *checkpoint; /* pretrained checkpoint to start from */
    const char *out;        /* where to save the trained model, or NULL */
    const char *resume;     /* training state to continue from, or NULL */
    long save_every;        /* save the training state to out every N steps (0: never) */
    long stop_after;        /* stop after this step, as if interrupted (0: never) */
    long kv_cache_mb;       /* memory budget of the pretrained K/V cache (0: no cache) */
} options;

static options default_options(int pretraining)
{
    options o;
    memset(&o, 0, sizeof o);
    o.method = pretraining ? METHOD_FT : METHOD_STOCHCA;
    o.p = 0.1;
    o.ratio = 1.0;
    /* Fine-tuning: chosen by validation accuracy on training-split images
       outside the 15% subset (see PAPER_NOTES.md), never on the test set. */
    o.lr = pretraining ? 1e-3 : 4e-3;
    o.wd = 0.05;
    o.head_lr_scale = 1.0;
    o.l2sp_alpha = 0.01;
    o.epochs = pretraining ? 10 : 40;
    o.warmup = 100;
    o.batch = pretraining ? 64 : 32;
    o.seed = 0;
    o.threads = 0;
    o.config.image_size = 28;
    o.config.channels = 1;
    o.config.patch_size = 7;
    o.config.dim = 64;
    o.config.depth = 6;
    o.config.heads = 4;
    o.config.mlp_dim = 256;
    o.config.classes = DATA_CLASSES;
    o.kv_cache_mb = 1024;
    o.data_dir = "data";
    o.checkpoint = "data/pretrained.bin";
    o.out = pretraining ? "pretrained.bin" : NULL;
    return o;
}

static void print_usage(FILE *f)
{
    fprintf(f,
        "usage: ./train                    the main job: fine-tune the shipped model on 15%% of MNIST\n"
        "                                  with plain fine-tuning and with StochCA, print both\n"
        "       ./train finetune [flags]   fine-tune a pretrained checkpoint on MNIST\n"
        "       ./train pretrain [flags]   train a ViT from scratch on Fashion-MNIST\n"
        "       ./train bench [flags]      time inference and training steps on random images\n"
        "                                  (default: patch 4, D 64, L 6, H 4, M 256, batch 64, p 0.5)\n"
        "       ./train --help\n"
        "\n"
        "fine-tuning flags:\n"
        "  --method NAME    ft, stochca, l2sp or stochca+l2sp (default stochca)\n"
        "  --p P            StochCA cross-attention probability in [0, 1] (default 0.1)\n"
        "  --ratio R        fraction of the MNIST training split in (0, 1], stratified (default 1)\n"
        "  --checkpoint F   pretrained checkpoint (default data/pretrained.bin)\n"
        "  --l2sp-alpha A   L2-SP strength, >= 0 (default 0.01)\n"
        "  --head-lr-scale S  learning-rate multiplier of the head, > 0 (default 1)\n"
        "pretraining and benchmark flags:\n"
        "  --dim D --depth L --heads H --mlp M --patch P   model shape (default 64 6 4 256 7)\n"
        "common flags:\n"
        "  --epochs E       passes over the training images (default 40 fine-tuning, 10 pretraining)\n"
        "  --steps N        optimizer steps; overrides --epochs\n"
        "  --batch B        images per step (default 32 fine-tuning, 64 pretraining)\n"
        "  --lr LR          peak learning rate (default 4e-3 fine-tuning, 1e-3 pretraining)\n"
        "  --wd WD          AdamW weight decay, >= 0 (default 0.05)\n"
        "  --warmup N       linear warm-up steps before the cosine decay (default 100)\n"
        "  --seed S         seed of the subset, data order, initialization and draws (default 0)\n"
        "  --threads N      OpenMP threads (default: all cores)\n"
        "  --data DIR       folder of the IDX files (default data)\n"
        "  --out F          save the trained model to F (pretraining default pretrained.bin)\n"
        "  --save-every N   also save the training state (AdamW moments, step, random\n"
        "                   generator) to --out every N steps, so a run can be resumed\n"
        "  --resume F       continue from the training state in F; give the other flags\n"
        "                   exactly as in the interrupted run\n"
        "  --stop-after N   stop after step N as if interrupted (to test --resume)\n"
        "  --kv-cache-mb N  memory budget in MiB for caching the pretrained keys and values\n"
        "                   of every training image; 0 recomputes them every step (default 1024)\n");
}

static int parse_double(const char *flag, const char *text, double low, double high, int low_open, double *out)
{
    char *end;
    double value;
    errno = 0;
    value = strtod(text, &end);
    if (end == text || *end != '\0' || errno != 0 || !isfinite(value) || value > high ||
        (low_open ? value <= low : value < low)) {
        fprintf(stderr, "train: invalid value '%s' for %s, expected a number in %s%g, %g]\n", text, flag,
                low_open ? "(" : "[", low, high);
        return 0;
    }
    *out = value;
    return 1;
}

static int parse_long(const char *flag, const char *text, long low, long high, long *out)
{
    char *end;
    long value;
    errno = 0;
    value = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0 || value < low || value > high) {
        fprintf(stderr, "train: invalid value '%s' for %s, expected an integer from %ld to %ld\n", text, flag,
                low, high);
        return 0;
    }
    *out = value;
    return 1;
}

static int parse_int(const char *flag, const char *text, long low, long high, int *out)
{
    long value;
    if (!parse_long(flag, text, low, high, &value))
        return 0;
    *out = (int)value;
    return 1;
}

static int parse_method(const char *text, method_kind *out)
{
    int i;
    for (i = 0; i < 4; i++)
        if (strcmp(text, method_names[i]) == 0) {
            *out = (method_kind)i;
            return 1;
        }
    fprintf(stderr, "train: invalid value '%s' for --method, expected ft, stochca, l2sp or stochca+l2sp\n", text);
    return 0;
}

/* Parses one "--flag value" pair. Returns 0 after printing a message. */
static int parse_flag(options *o, const char *flag, const char *value)
{
    if (!value) {
        fprintf(stderr, "train: missing value for %s\n", flag);
        return 0;
    }
    if (!strcmp(flag, "--method")) return parse_method(value, &o->method);
    if (!strcmp(flag, "--p")) return parse_double(flag, value, 0, 1, 0, &o->p);
    if (!strcmp(flag, "--ratio")) return parse_double(flag, value, 0, 1, 1, &o->ratio);
    if (!strcmp(flag, "--lr")) return parse_double(flag, value, 0, 1, 1, &o->lr);
    if (!strcmp(flag, "--wd")) return parse_double(flag, value, 0, 10, 0, &o->wd);
    if (!strcmp(flag, "--head-lr-scale")) return parse_double(flag, value, 0, 1000, 1, &o->head_lr_scale);
    if (!strcmp(flag, "--l2sp-alpha")) return parse_double(flag, value, 0, 100, 0, &o->l2sp_alpha);
    if (!strcmp(flag, "--epochs")) return parse_long(flag, value, 1, 100000, &o->epochs);
    if (!strcmp(flag, "--steps")) return parse_long(flag, value, 1, 100000000L, &o->steps);
    if (!strcmp(flag, "--warmup")) return parse_long(flag, value, 0, 100000000L, &o->warmup);
    if (!strcmp(flag, "--batch")) return parse_int(flag, value, 1, 65536, &o->batch);
    if (!strcmp(flag, "--seed")) return parse_long(flag, value, 0, 2147483647L, &o->seed);
    if (!strcmp(flag, "--threads")) return parse_int(flag, value, 1, 1024, &o->threads);
    if (!strcmp(flag, "--dim")) return parse_int(flag, value, 1, 4096, &o->config.dim);
    if (!strcmp(flag, "--depth")) return parse_int(flag, value, 1, STOCHCA_MAX_DEPTH, &o->config.depth);
    if (!strcmp(flag, "--heads")) return parse_int(flag, value, 1, 4096, &o->config.heads);
    if (!strcmp(flag, "--mlp")) return parse_int(flag, value, 1, 65536, &o->config.mlp_dim);
    if (!strcmp(flag, "--patch")) return parse_int(flag, value, 1, 28, &o->config.patch_size);
    if (!strcmp(flag, "--data")) { o->data_dir = value; return 1; }
    if (!strcmp(flag, "--checkpoint")) { o->checkpoint = value; return 1; }
    if (!strcmp(flag, "--out")) { o->out = value; return 1; }
    if (!strcmp(flag, "--resume")) { o->resume = value; return 1; }
    if (!strcmp(flag, "--save-every")) return parse_long(flag, value, 1, 100000000L, &o->save_every);
    if (!strcmp(flag, "--stop-after")) return parse_long(flag, value, 1, 100000000L, &o->stop_after);
    if (!strcmp(flag, "--kv-cache-mb")) return parse_long(flag, value, 0, 1048576L, &o->kv_cache_mb);
    fprintf(stderr, "train: unknown flag '%s'\n\n", flag);
    print_usage(stderr);
    return 0;
}

static int parse_options(options *o, int argc, char **argv)
{
    int i;
    for (i = 0; i < argc; i += 2)
        if (!parse_flag(o, argv[i], i + 1 < argc ? argv[i + 1] : NULL))
            return 0;
    if (o->save_every > 0 && !o->out) {
        fprintf(stderr, "train: --save-every needs --out, the file to save the training state to\n");
        return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------------------
   Training and evaluation */

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int argmax(const stochca_real *x, int n)
{
    int best = 0, i;
    for (i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* Buffers of one training or evaluation run. */
typedef struct {
    int *order;            /* (count) image order of the current epoch */
    stochca_real *images;  /* (B, 1, S, S) */
    int *labels;           /* (B) */
} batch_buffers;

static int alloc_buffers(batch_buffers *buf, int count, int B, int image_size)
{
    buf->order = (int *)malloc((size_t)count * sizeof(int));
    buf->images = (stochca_real *)malloc((size_t)B * image_size * image_size * sizeof(stochca_real));
    buf->labels = (int *)malloc((size_t)B * sizeof(int));
    if (buf->order && buf->images && buf->labels)
        return 1;
    fprintf(stderr, "train: out of memory for batches of %d images\n", B);
    return 0;
}

static void free_buffers(batch_buffers *buf)
{
    free(buf->order);
    free(buf->images);
    free(buf->labels);
}

/* Returns the accuracy of the self-attention-only model on d, in percent. */
static double evaluate(stochca_model *m, const dataset *d, batch_buffers *buf)
{
    const int B = m->batch_capacity;
    int start, b, correct = 0;
    for (start = 0; start < d->count; start++)
        buf->order[start] = start;
    for (start = 0; start < d->count; start += B) {
        int n = d->count - start < B ? d->count - start : B;
        fill_batch(d, buf->order + start, n, buf->images, buf->labels);
        stochca_forward(m, buf->images, NULL, n, NULL, NULL, NULL);
        for (b = 0; b < n; b++)
            correct += argmax(m->acts.logits + (size_t)b * m->config.classes, m->config.classes) == buf->labels[b];
    }
    return 100.0 * correct / d->count;
}

static void print_progress(const char *label, long step, long total, double loss, double accuracy,
                           double images_per_second, double elapsed)
{
    double left = step > 0 ? elapsed / step * (total - step) : 0;
    fprintf(stderr, "\r%s step %ld/%ld  loss %.4f  train acc %5.1f%%  %5.0f img/s  %2d:%02d left ", label, step,
            total, loss, accuracy, images_per_second, (int)left / 60, (int)left % 60);
    fflush(stderr);
}

/* One optimizer step on the batch in buf. Returns 0 after printing a
   message if the loss or a gradient is not finite. */
static int train_step(stochca_model *m, stochca_model *pretrained, stochca_kv_cache *cache, const options *o,
                      stochca_rng *rng, batch_buffers *buf, const int *indices, int B, long step, long total,
                      long warmup)
{
    unsigned char cross[STOCHCA_MAX_DEPTH];
    const int stochca = o->method == METHOD_STOCHCA || o->method == METHOD_STOCHCA_L2SP;
    const int l2sp = o->method == METHOD_L2SP || o->method == METHOD_STOCHCA_L2SP;
    stochca_adamw opt = stochca_adamw_default();
    stochca_kv kv;
    stochca_error err;
    int l, any_cross = 0;
    double grad_norm;

    if (stochca) {
        stochca_draw_cross(rng, (float)o->p, m->config.depth, cross);
        for (l = 0; l < m->config.depth; l++)
            any_cross |= cross[l];
    }
    if (any_cross) {
        int status = cache ? stochca_kv_cache_lookup(cache, pretrained, buf->images, indices, B, &kv, &err)
                           : stochca_pretrained_kv(pretrained, buf->images, B, &kv, &err);
        if (status != STOCHCA_OK) {
            fprintf(stderr, "\ntrain: %s\n", err.message);
            return 0;
        }
    }
    stochca_zero_grad(m);
    if (stochca_forward(m, buf->images, buf->labels, B, any_cross ? cross : NULL, any_cross ? &kv : NULL,
                        &err) != STOCHCA_OK ||
        stochca_backward(m, &err) != STOCHCA_OK) {
        fprintf(stderr, "\ntrain: %s\n", err.message);
        return 0;
    }
    if (l2sp)
        stochca_l2sp(m, pretrained, (float)o->l2sp_alpha);
    grad_norm = stochca_grad_norm(m);
    if (!isfinite(m->loss) || !isfinite(grad_norm)) {
        fprintf(stderr, "\ntrain: step %ld: the %s is not finite (loss %g, gradient norm %g). Training "
                "stopped before the update; %s. Try a lower --lr (now %g).\n", step + 1,
                isfinite(m->loss) ? "gradient" : "loss", (double)m->loss, grad_norm,
                o->save_every > 0 ? "the last saved training state is kept" : "nothing was saved", o->lr);
        return 0;
    }
    opt.lr = stochca_cosine_lr((float)o->lr, step, warmup, total);
    opt.weight_decay = (float)o->wd;
    opt.head_lr_scale = (float)o->head_lr_scale;
    opt.decay_head_only = l2sp;
    stochca_adamw_update(m, &opt);
    return 1;
}

static int uses_stochca(method_kind method)
{
    return method == METHOD_STOCHCA || method == METHOD_STOCHCA_L2SP;
}

/* Opens a cache of the pretrained K0 and V0 of the count training images,
   which do not change between epochs. Returns 0, after saying why, when it
   would exceed budget_mb; training then recomputes them every step. */
static int open_kv_cache(stochca_kv_cache *cache, const stochca_config *c, int count, int B, long budget_mb)
{
    stochca_error err;
    if (budget_mb == 0)
        return 0;
    if (stochca_kv_cache_init(cache, c, count, B, (double)budget_mb * 1048576.0, &err) == STOCHCA_OK) {
        fprintf(stderr, "K/V cache: %.1f MiB for %d images\n", stochca_kv_cache_bytes(c, count, B) / 1048576.0,
                count);
        return 1;
    }
    fprintf(stderr, "K/V cache off, recomputing the pretrained keys and values every step: %s "
            "(raise --kv-cache-mb to use it)\n", err.message);
    return 0;
}

/* Saves m with its AdamW moments and the generator of the Bernoulli draws. */
static int save_state(const stochca_model *m, const stochca_rng *rng, const char *path)
{
    stochca_error err;
    if (stochca_checkpoint_save(m, rng, path, 1, &err) == STOCHCA_OK)
        return 1;
    fprintf(stderr, "\ntrain: %s\n", err.message);
    return 0;
}

/* Loads the training state of an interrupted run into m and rng. */
static int resume_state(stochca_model *m, stochca_rng *rng, const char *path)
{
    stochca_error err;
    if (stochca_checkpoint_load(m, rng, path, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        return 0;
    }
    if (m->adam_step == 0) {
        fprintf(stderr, "train: '%s' contains no training state; --resume needs a file written with "
                "--save-every\n", path);
        return 0;
    }
    fprintf(stderr, "resuming from '%s' at step %ld\n", path, m->adam_step);
    return 1;
}

enum { TRAIN_FAILED = 0, TRAIN_DONE = 1, TRAIN_STOPPED = 2 };

/* Trains m on d with the settings in o. pretrained is needed for StochCA and
   L2-SP and may be NULL otherwise. Returns TRAIN_DONE, TRAIN_STOPPED
   (--stop-after) or TRAIN_FAILED after printing a message. */
static int train_model(stochca_model *m, stochca_model *pretrained, const dataset *d, const options *o,
                       const char *label)
{
    const int B = o->batch < d->count ? o->batch : d->count;
    const long steps_per_epoch = d->count / B;
    const long total = o->steps > 0 ? o->steps : o->epochs * steps_per_epoch;
    const long warmup = o->warmup < total ? o->warmup : total;
    batch_buffers buf;
    stochca_rng rng;
    stochca_error err;
    stochca_kv_cache cache;
    double start = now_seconds(), last_print = start, window_loss = 0;
    long step = 0, first_step, window_steps = 0, window_images = 0, window_correct = 0;
    int result = TRAIN_DONE, b, cache_ready = 0;

    memset(&buf, 0, sizeof buf);
    memset(&cache, 0, sizeof cache);
    if (o->method != METHOD_FT && !pretrained) {
        fprintf(stderr, "train: --method %s needs a pretrained model\n", method_names[o->method]);
        return TRAIN_FAILED;
    }
    if (stochca_model_reserve(m, B, 1, &err) != STOCHCA_OK ||
        (pretrained && stochca_model_reserve(pretrained, B, 0, &err) != STOCHCA_OK)) {
        fprintf(stderr, "train: %s\n", err.message);
        return TRAIN_FAILED;
    }
    stochca_rng_seed(&rng, (uint64_t)o->seed);
    if (o->resume && !resume_state(m, &rng, o->resume))
        return TRAIN_FAILED;
    if (!alloc_buffers(&buf, d->count, B, d->rows))
        return TRAIN_FAILED;
    cache_ready = uses_stochca(o->method) && open_kv_cache(&cache, &m->config, d->count, B, o->kv_cache_mb);

    /* The image order of an epoch depends only on (seed, epoch), so a
       resumed run recomputes it instead of storing it. */
    first_step = m->adam_step;
    if (first_step > 0 && first_step < total)
        epoch_order(buf.order, d->count, (uint64_t)o->seed, first_step / steps_per_epoch);
    for (step = first_step; step < total; step++) {
        const long position = step % steps_per_epoch;
        double now;
        if (position == 0)
            epoch_order(buf.order, d->count, (uint64_t)o->seed, step / steps_per_epoch);
        fill_batch(d, buf.order + position * B, B, buf.images, buf.labels);
        if (!train_step(m, pretrained, cache_ready ? &cache : NULL, o, &rng, &buf, buf.order + position * B, B,
                        step, total, warmup)) {
            result = TRAIN_FAILED;
            break;
        }

        /* Loss and accuracy are averaged over the steps since the last line. */
        for (b = 0; b < B; b++)
            window_correct += argmax(m->acts.logits + (size_t)b * m->config.classes, m->config.classes) ==
                              buf.labels[b];
        window_images += B;
        window_loss += m->loss;
        window_steps += 1;
        now = now_seconds();
        if (now - last_print > 1.0 || step + 1 == total) {
            print_progress(label, step + 1, total, window_loss / window_steps,
                           100.0 * window_correct / window_images,
                           (double)(step + 1 - first_step) * B / (now - start), now - start);
            last_print = now;
            window_loss = 0;
            window_steps = window_images = window_correct = 0;
        }

        if (o->save_every > 0 && ((step + 1) % o->save_every == 0 || step + 1 == total) &&
            !save_state(m, &rng, o->out)) {
            result = TRAIN_FAILED;
            break;
        }
        if (o->stop_after > 0 && step + 1 == o->stop_after && step + 1 < total) {
            result = TRAIN_STOPPED;
            break;
        }
    }
    fprintf(stderr, "\n");
    if (result == TRAIN_STOPPED)
        fprintf(stderr, "stopped after step %ld; continue with --resume %s\n", step + 1, o->out ? o->out : "FILE");
    free_buffers(&buf);
    stochca_kv_cache_free(&cache);
    return result;
}

/* ---------------------------------------------------------------------------
   Commands */

static int load_split(dataset *d, const char *data_dir, const char *name, const char *split, int image_size)
{
    char images[1024], labels[1024], msg[4096];
    snprintf(images, sizeof images, "%s/%s-%s-images.idx", data_dir, name, split);
    snprintf(labels, sizeof labels, "%s/%s-%s-labels.idx", data_dir, name, split);
    if (load_dataset(d, images, labels, image_size, msg, sizeof msg))
        return 1;
    fprintf(stderr, "train: %s\n", msg);
    return 0;
}

/* Evaluates m on d with batches of up to 256 images. Returns -1 on failure. */
static double test_accuracy(stochca_model *m, const dataset *d)
{
    batch_buffers buf;
    stochca_error err;
    double accuracy = -1;
    memset(&buf, 0, sizeof buf);
    if (stochca_model_reserve(m, 256, 0, &err) != STOCHCA_OK)
        fprintf(stderr, "train: %s\n", err.message);
    else if (alloc_buffers(&buf, d->count, 256, d->rows))
        accuracy = evaluate(m, d, &buf);
    free_buffers(&buf);
    return accuracy;
}

static int save_model(const stochca_model *m, const char *path)
{
    stochca_error err;
    if (!path)
        return 1;
    if (stochca_checkpoint_save(m, NULL, path, 0, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        return 0;
    }
    fprintf(stderr, "saved %s\n", path);
    return 1;
}

static void set_threads(const options *o)
{
#ifdef _OPENMP
    if (o->threads > 0)
        omp_set_num_threads(o->threads);
#else
    (void)o;
#endif
}

static int cmd_pretrain(const options *o)
{
    dataset train, test;
    stochca_model m;
    stochca_rng rng;
    stochca_error err;
    double accuracy = -1, start = now_seconds();
    int ok = 0;

    memset(&m, 0, sizeof m);
    if (!load_split(&train, o->data_dir, "fashion", "train", o->config.image_size))
        return 0;
    if (!load_split(&test, o->data_dir, "fashion", "test", o->config.image_size)) {
        free_dataset(&train);
        return 0;
    }
    if (stochca_model_init(&m, &o->config, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
    } else {
        stochca_rng_seed(&rng, (uint64_t)o->seed);
        stochca_model_init_random(&m, &rng);
        fprintf(stderr, "pretraining on %d Fashion-MNIST images, %zu parameters\n", train.count, m.num_params);
        ok = train_model(&m, NULL, &train, o, "pretrain");
        if (ok == TRAIN_DONE && (accuracy = test_accuracy(&m, &test)) >= 0) {
            printf("Fashion-MNIST test accuracy: %.2f%% (%d images, %.0f s)\n", accuracy, test.count,
                   now_seconds() - start);
            ok = o->save_every > 0 || save_model(&m, o->out);
        } else if (ok == TRAIN_DONE) {
            ok = 0;
        }
    }
    stochca_model_free(&m);
    free_dataset(&train);
    free_dataset(&test);
    return ok;
}

/* Loads the pretrained checkpoint and checks that it fits 28x28 grey images. */
static int load_pretrained(stochca_model *pre, const char *path, int image_size)
{
    stochca_config c;
    stochca_error err;
    if (stochca_checkpoint_read_config(path, &c, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        return 0;
    }
    if (c.image_size != image_size || c.channels != 1) {
        fprintf(stderr, "train: checkpoint '%s' is for %dx%dx%d images, but the data is %dx%dx1\n", path,
                c.image_size, c.image_size, c.channels, image_size, image_size);
        return 0;
    }
    if (stochca_model_init(pre, &c, &err) != STOCHCA_OK || stochca_checkpoint_load(pre, NULL, path, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        stochca_model_free(pre);
        return 0;
    }
    return 1;
}

/* Outcome of one fine-tuning run. */
typedef struct {
    double accuracy;    /* MNIST test accuracy in percent */
    int train_images;
    double seconds;
} run_result;

/* Fine-tunes the pretrained checkpoint on MNIST. Returns TRAIN_DONE with
   *result filled in, TRAIN_STOPPED or TRAIN_FAILED. */
static int run_finetune(const options *o, run_result *result)
{
    dataset full, train, test;
    stochca_model pre, target;
    stochca_error err;
    const char *name = method_names[o->method];
    double start = now_seconds();
    int status = TRAIN_FAILED;

    memset(&pre, 0, sizeof pre);
    memset(&target, 0, sizeof target);
    memset(&train, 0, sizeof train);
    memset(&test, 0, sizeof test);
    if (!load_split(&full, o->data_dir, "mnist", "train", 28))
        return TRAIN_FAILED;
    if (!load_split(&test, o->data_dir, "mnist", "test", 28) || !load_pretrained(&pre, o->checkpoint, 28))
        goto done;
    if (!make_subset(&full, o->ratio, (uint64_t)o->seed, &train)) {
        fprintf(stderr, "train: out of memory for the training subset\n");
        goto done;
    }
    if (stochca_model_init_transfer(&target, &pre, DATA_CLASSES, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        goto done;
    }
    fprintf(stderr, "fine-tuning with %s on %d MNIST images (ratio %g, seed %ld)\n", name, train.count, o->ratio,
            o->seed);
    status = train_model(&target, o->method == METHOD_FT ? NULL : &pre, &train, o, name);
    if (status != TRAIN_DONE)
        goto done;
    result->accuracy = test_accuracy(&target, &test);
    result->train_images = train.count;
    result->seconds = now_seconds() - start;
    /* With --save-every, the training state at --out is already the final model. */
    if (result->accuracy < 0 || (o->save_every == 0 && !save_model(&target, o->out)))
        status = TRAIN_FAILED;
done:
    stochca_model_free(&pre);
    stochca_model_free(&target);
    free_dataset(&full);
    free_dataset(&train);
    free_dataset(&test);
    return status;
}

static int cmd_finetune(const options *o)
{
    run_result r;
    int status = run_finetune(o, &r);
    if (status != TRAIN_DONE)
        return status == TRAIN_STOPPED;
    printf("%s p=%g ratio=%g seed=%ld: MNIST test accuracy %.2f%% (%d training images, %.0f s)\n",
           method_names[o->method], uses_stochca(o->method) ? o->p : 0.0, o->ratio, o->seed, r.accuracy,
           r.train_images, r.seconds);
    return 1;
}

/* The main job: plain fine-tuning and StochCA on 15% of MNIST. */
static int cmd_main_job(options o)
{
    const method_kind methods[2] = {METHOD_FT, METHOD_STOCHCA};
    run_result r[2];
    int i;
    o.ratio = 0.15;
    for (i = 0; i < 2; i++) {
        o.method = methods[i];
        if (run_finetune(&o, &r[i]) != TRAIN_DONE)
            return 0;
    }
    printf("\nMNIST, %d training images (15%% of the split), %ld epochs, seed %ld, checkpoint %s\n",
           r[0].train_images, o.epochs, o.seed, o.checkpoint);
    printf("%-10s %-6s %-14s %s\n", "method", "p", "test accuracy", "time");
    for (i = 0; i < 2; i++)
        printf("%-10s %-6.2f %6.2f%%        %.0f s\n", method_names[methods[i]], uses_stochca(methods[i]) ? o.p : 0.0,
               r[i].accuracy, r[i].seconds);
    return 1;
}

/* ---------------------------------------------------------------------------
   Benchmark: images per second of inference, fine-tuning and StochCA steps
   on random images, for the model shape and batch given by the flags. */

#define BENCH_MIN_SECONDS 3.0   /* time each case at least this long */
#define BENCH_POOL_BATCHES 4    /* distinct batches cycled through */

/* Peak resident memory of this process in MiB, or -1 where unknown. */
static double peak_memory_mib(void)
{
#ifdef __unix__
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) == 0)
        return usage.ru_maxrss / 1024.0;  /* kilobytes on Linux */
#endif
    return -1;
}

typedef enum { BENCH_INFER, BENCH_FINETUNE, BENCH_STOCHCA, BENCH_STOCHCA_CACHED } bench_case;

static const char *const bench_names[4] = {"infer", "finetune", "stochca", "stochca-cached"};

/* State shared by the benchmark cases. */
typedef struct {
    stochca_model target, pretrained;
    stochca_kv_cache cache;
    stochca_rng rng;
    stochca_real *images;   /* (BENCH_POOL_BATCHES * B, C, S, S) */
    int *labels;            /* (BENCH_POOL_BATCHES * B) */
    int *indices;           /* (BENCH_POOL_BATCHES * B) cache entry of each image */
    int batch;
    double p;
} bench_state;

/* Runs one step of `kind` on pool batch i. Returns its FLOPs per image, or -1. */
static double bench_step(bench_state *s, bench_case kind, int i)
{
    const stochca_config *c = &s->target.config;
    const int B = s->batch;
    const size_t image = (size_t)c->channels * c->image_size * c->image_size;
    const stochca_real *images = s->images + (size_t)i * B * image;
    const int *labels = s->labels + (size_t)i * B;
    unsigned char cross[STOCHCA_MAX_DEPTH];
    stochca_adamw opt = stochca_adamw_default();
    stochca_kv kv;
    stochca_error err;
    int l, any = 0, status = STOCHCA_OK;

    if (kind == BENCH_INFER)
        return stochca_forward(&s->target, images, NULL, B, NULL, NULL, &err) == STOCHCA_OK
                   ? stochca_flops_forward(c) : -1;
    if (kind != BENCH_FINETUNE) {
        stochca_draw_cross(&s->rng, (float)s->p, c->depth, cross);
        for (l = 0; l < c->depth; l++)
            any |= cross[l];
    }
    if (any && kind == BENCH_STOCHCA)
        status = stochca_pretrained_kv(&s->pretrained, images, B, &kv, &err);
    else if (any)
        status = stochca_kv_cache_lookup(&s->cache, &s->pretrained, images, s->indices + (size_t)i * B, B, &kv, &err);
    stochca_zero_grad(&s->target);
    if (status != STOCHCA_OK ||
        stochca_forward(&s->target, images, labels, B, any ? cross : NULL, any ? &kv : NULL, &err) != STOCHCA_OK ||
        stochca_backward(&s->target, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        return -1;
    }
    stochca_adamw_update(&s->target, &opt);
    return stochca_flops_train_step(c, any ? cross : NULL, any && kind == BENCH_STOCHCA);
}

/* Times `kind` for at least BENCH_MIN_SECONDS (or `steps` steps) after two
   warm-up steps. Writes images per second of wall time and of processor
   time (summed over threads, so less disturbed by other programs), and
   GFLOP/s of wall time. */
static int bench_case_run(bench_state *s, bench_case kind, long steps, double *images_per_second,
                          double *images_per_cpu_second, double *gflops)
{
    double start, elapsed, flops = 0;
    clock_t cpu_start;
    long n;
    if (bench_step(s, kind, 0) < 0 || bench_step(s, kind, 1) < 0)
        return 0;
    cpu_start = clock();
    start = now_seconds();
    for (n = 0; steps > 0 ? n < steps : (n < 5 || now_seconds() - start < BENCH_MIN_SECONDS); n++) {
        double step_flops = bench_step(s, kind, (int)(n % BENCH_POOL_BATCHES));
        if (step_flops < 0)
            return 0;
        flops += step_flops * s->batch;
    }
    elapsed = now_seconds() - start;
    *images_per_cpu_second = (double)n * s->batch / ((double)(clock() - cpu_start) / CLOCKS_PER_SEC);
    *images_per_second = (double)n * s->batch / elapsed;
    *gflops = flops / elapsed / 1e9;
    return 1;
}

static int bench_setup(bench_state *s, const options *o)
{
    const stochca_config *c = &o->config;
    const int pool = BENCH_POOL_BATCHES * o->batch;
    const size_t image = (size_t)c->channels * c->image_size * c->image_size;
    stochca_error err;
    size_t i;

    s->batch = o->batch;
    s->p = o->p;
    s->images = (stochca_real *)malloc((size_t)pool * image * sizeof(stochca_real));
    s->labels = (int *)malloc((size_t)pool * sizeof(int));
    s->indices = (int *)malloc((size_t)pool * sizeof(int));
    if (!s->images || !s->labels || !s->indices) {
        fprintf(stderr, "train: out of memory for %d benchmark images\n", pool);
        return 0;
    }
    stochca_rng_seed(&s->rng, (uint64_t)o->seed);
    for (i = 0; i < (size_t)pool * image; i++)
        s->images[i] = 2 * stochca_rng_uniform(&s->rng) - 1;
    for (i = 0; i < (size_t)pool; i++) {
        s->labels[i] = (int)(stochca_rng_next(&s->rng) % (uint64_t)c->classes);
        s->indices[i] = (int)i;
    }
    if (stochca_model_init(&s->target, c, &err) != STOCHCA_OK ||
        stochca_model_init(&s->pretrained, c, &err) != STOCHCA_OK ||
        stochca_model_reserve(&s->target, o->batch, 1, &err) != STOCHCA_OK ||
        stochca_model_reserve(&s->pretrained, o->batch, 0, &err) != STOCHCA_OK ||
        stochca_kv_cache_init(&s->cache, c, pool, o->batch, (double)o->kv_cache_mb * 1048576.0, &err) != STOCHCA_OK) {
        fprintf(stderr, "train: %s\n", err.message);
        return 0;
    }
    stochca_model_init_random(&s->target, &s->rng);
    stochca_model_init_random(&s->pretrained, &s->rng);
    return 1;
}

static void bench_free(bench_state *s)
{
    stochca_model_free(&s->target);
    stochca_model_free(&s->pretrained);
    stochca_kv_cache_free(&s->cache);
    free(s->images);
    free(s->labels);
    free(s->indices);
}

/* Bytes of parameters, gradients, AdamW moments, activations and K/V cache. */
static double bench_tensor_mib(const bench_state *s)
{
    const double real = sizeof(stochca_real), q = (double)s->target.num_params;
    const double target = q * 4 + 2.0 * s->target.num_acts, pretrained = q + s->pretrained.num_acts;
    const double cache = stochca_kv_cache_bytes(&s->target.config, s->cache.count, s->batch);
    return ((target + pretrained) * real + cache) / 1048576.0;
}

static int cmd_bench(const options *o)
{
    bench_state s;
    double rate[4], cpu_rate[4], gflops[4], peak, tensors;
    int k, i, threads = 1;
    memset(&s, 0, sizeof s);
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (!bench_setup(&s, o)) {
        bench_free(&s);
        return 0;
    }
    printf("config: %dx%dx%d images, patch %d (%d tokens), D %d, L %d, H %d, M %d, %d classes, batch %d, p %g, "
           "%d threads\n", o->config.image_size, o->config.image_size, o->config.channels, o->config.patch_size,
           stochca_num_tokens(&o->config), o->config.dim, o->config.depth, o->config.heads, o->config.mlp_dim,
           o->config.classes, o->batch, o->p, threads);
    /* Fill the cache outside the timing, as the first epoch of training would. */
    for (i = 0; i < BENCH_POOL_BATCHES; i++) {
        stochca_kv kv;
        stochca_error err;
        if (stochca_kv_cache_lookup(&s.cache, &s.pretrained, s.images + (size_t)i * o->batch * o->config.image_size *
                                    o->config.image_size * o->config.channels, s.indices + i * o->batch, o->batch, &kv,
                                    &err) != STOCHCA_OK) {
            fprintf(stderr, "train: %s\n", err.message);
            bench_free(&s);
            return 0;
        }
    }
    for (k = 0; k < 4; k++) {
        if (!bench_case_run(&s, (bench_case)k, o->steps, &rate[k], &cpu_rate[k], &gflops[k])) {
            bench_free(&s);
            return 0;
        }
        printf("%s: %.0f images/s (%.0f per processor-second)\n", bench_names[k], rate[k], cpu_rate[k]);
        fflush(stdout);
    }
    printf("GFLOP/s: infer %.1f, finetune %.1f, stochca %.1f, stochca-cached %.1f\n", gflops[0], gflops[1], gflops[2],
           gflops[3]);
    peak = peak_memory_mib();
    tensors = bench_tensor_mib(&s);
    printf("peak memory: %.0f MiB resident; parameters, gradients, moments, activations and K/V cache: %.0f MiB "
           "(ratio %.2f)\n", peak, tensors, peak / tensors);
    bench_free(&s);
    return 1;
}

#ifndef STOCHCA_TRAIN_NO_MAIN
int main(int argc, char **argv)
{
    const char *command = argc > 1 ? argv[1] : "";
    int pretraining = !strcmp(command, "pretrain"), benchmark = !strcmp(command, "bench"), ok;
    options o = default_options(pretraining || benchmark);

    if (!strcmp(command, "--help") || !strcmp(command, "-h")) {
        print_usage(stdout);
        return 0;
    }
    if (benchmark) {
        /* The reference configuration of the benchmark: 50 tokens, p = 0.5. */
        o.config.patch_size = 4;
        o.p = 0.5;
    }
    if (argc > 1 && !pretraining && !benchmark && strcmp(command, "finetune")) {
        fprintf(stderr, "train: unknown command '%s'\n\n", command);
        print_usage(stderr);
        return 2;
    }
    if (!parse_options(&o, argc > 1 ? argc - 2 : 0, argv + 2))
        return 2;
    set_threads(&o);
    if (pretraining)
        ok = cmd_pretrain(&o);
    else if (benchmark)
        ok = cmd_bench(&o);
    else if (argc > 1)
        ok = cmd_finetune(&o);
    else
        ok = cmd_main_job(o);
    return ok ? 0 : 1;
}
#endif
