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
#include <sys/stat.h>  /* mkdir and stat for --out-dir and --out (POSIX) */
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
   Rotated MNIST, after RotatedMNIST in DomainBed's domainbed/datasets.py:
   all digits of the train and test files, shuffled once, dealt into six
   interleaved shares (image j of the shuffled list goes to share j mod 6),
   share i rotated by domain_angles[i] degrees. Two differences: there are
   10,000 digits here instead of 70,000, and the rotation samples
   bilinearly where that file uses PIL's bicubic resampling. */

#define DOMAIN_COUNT 6
#define ROTATED_MNIST_SEED 0         /* seed of the one shuffle of all digits */
#define DG_VALIDATION_FRACTION 0.2   /* share of each training domain held out for validation */

static const int domain_angles[DOMAIN_COUNT] = {0, 15, 30, 45, 60, 75};

/* Returns pixel (row, col) of a side x side image, or 0 outside the image. */
static double pixel_or_zero(const unsigned char *image, int side, int row, int col)
{
    if (row < 0 || row >= side || col < 0 || col >= side)
        return 0;
    return image[(size_t)row * side + col];
}

/* Samples a side x side image at the real position (row, col) by bilinear
   interpolation of its four neighboring pixels, which read 0 outside it. */
static double sample_bilinear(const unsigned char *image, int side, double row, double col)
{
    const int r0 = (int)floor(row), c0 = (int)floor(col);
    const double fr = row - r0, fc = col - c0;
    return (1 - fr) * (1 - fc) * pixel_or_zero(image, side, r0, c0) +
           (1 - fr) * fc * pixel_or_zero(image, side, r0, c0 + 1) +
           fr * (1 - fc) * pixel_or_zero(image, side, r0 + 1, c0) +
           fr * fc * pixel_or_zero(image, side, r0 + 1, c0 + 1);
}

/* Rotates a side x side image counterclockwise (as displayed, row 0 at the
   top) by `degrees` about its center ((side - 1) / 2, (side - 1) / 2).
   Each output pixel samples the input bilinearly at the position that the
   rotation moves onto it, and rounds to the nearest byte. */
static void rotate_image(unsigned char *out, const unsigned char *in, int side, double degrees)
{
    const double radians = degrees * (acos(-1.0) / 180.0);
    const double cosine = cos(radians), sine = sin(radians), center = (side - 1) / 2.0;
    int row, col;

    for (row = 0; row < side; row++)
        for (col = 0; col < side; col++) {
            /* x points right and y up from the center. Rotating (x, y) by
               -degrees gives the input position that lands here. */
            const double x = col - center, y = center - row;
            const double source_x = cosine * x + sine * y, source_y = -sine * x + cosine * y;
            const double value = sample_bilinear(in, side, center - source_y, center + source_x);
            out[(size_t)row * side + col] = (unsigned char)(value >= 255 ? 255 : floor(value + 0.5));
        }
}

/* All MNIST digits as six rotated domains. */
typedef struct {
    dataset images;  /* (count) every digit once, in shuffled order, rotated by its domain's angle */
    int *source;     /* (count) index of each image in the train digits followed by the test digits */
    int *domain;     /* (count) domain of each image, 0 to DOMAIN_COUNT - 1 */
} rotated_mnist;

static void free_rotated_mnist(rotated_mnist *r)
{
    free_dataset(&r->images);
    free(r->source);
    free(r->domain);
    r->source = r->domain = NULL;
}

/* Builds Rotated MNIST from the MNIST train and test files (same image
   size). Returns 0 after printing a message on allocation failure. */
static int build_rotated_mnist(const dataset *train, const dataset *test, rotated_mnist *r)
{
    const int count = train->count + test->count, side = train->rows;
    const size_t image = (size_t)side * side;
    stochca_rng rng;
    int j;

    memset(r, 0, sizeof *r);
    r->source = identity_indices(count);
    r->domain = (int *)malloc((size_t)count * sizeof(int));
    r->images.pixels = (unsigned char *)malloc((size_t)count * image);
    r->images.labels = (unsigned char *)malloc((size_t)count);
    if (!r->source || !r->domain || !r->images.pixels || !r->images.labels) {
        fprintf(stderr, "train: out of memory for Rotated MNIST (%d images)\n", count);
        free_rotated_mnist(r);
        return 0;
    }
    r->images.count = count;
    r->images.rows = r->images.cols = side;

    stochca_rng_seed(&rng, ROTATED_MNIST_SEED);
    shuffle_indices(r->source, count, &rng);
    for (j = 0; j < count; j++) {
        const int k = r->source[j];
        const dataset *from = k < train->count ? train : test;
        const int index = k < train->count ? k : k - train->count;
        r->domain[j] = j % DOMAIN_COUNT;
        rotate_image(r->images.pixels + (size_t)j * image, from->pixels + (size_t)index * image, side,
                     domain_angles[r->domain[j]]);
        r->images.labels[j] = from->labels[index];
    }
    return 1;
}

/* Splits Rotated MNIST for one leave-one-domain-out run, as image indices.
   test gets every image of test_domain. From every other domain e, a
   stratified DG_VALIDATION_FRACTION goes to val and the rest to train,
   chosen by a shuffle seeded with (seed, e), so each seed holds out its
   own validation images. Each list needs room for r->images.count indices.
   Returns 0 on allocation failure. */
static int split_domains(const rotated_mnist *r, int test_domain, long seed, int *train, int *train_count,
                         int *val, int *val_count, int *test, int *test_count)
{
    int *members = (int *)malloc((size_t)r->images.count * sizeof(int));
    int e, j;

    if (!members)
        return 0;
    *train_count = *val_count = *test_count = 0;
    for (e = 0; e < DOMAIN_COUNT; e++) {
        int n = 0, picked = 0, rest = 0;
        const uint64_t split_seed = (uint64_t)seed * DOMAIN_COUNT + (uint64_t)e;
        for (j = 0; j < r->images.count; j++)
            if (r->domain[j] == e)
                members[n++] = j;
        if (e == test_domain) {
            memcpy(test, members, (size_t)n * sizeof(int));
            *test_count = n;
            continue;
        }
        if (!split_by_class(&r->images, members, n, DG_VALIDATION_FRACTION, split_seed, val + *val_count, &picked,
                            train + *train_count, &rest)) {
            free(members);
            return 0;
        }
        *val_count += picked;
        *train_count += rest;
    }
    free(members);
    return 1;
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
    int p_given;            /* --p was on the command line */
    int seeds;              /* sweeps: seeds 0 to seeds - 1 of every cell */
    const char *out_dir;    /* sweeps: folder of the TSV and SVG files */
    long eval_every;        /* dg-sweep: validation every eval_every steps */
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
    o.epochs = pretraining ? 10 : 60;
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
    o.seeds = 3;
    o.out_dir = "out";
    o.eval_every = 50;
    return o;
}

/* Steps of every sweep run, whatever the size of its training set. */
#define SWEEP_DEFAULT_STEPS 400

static void print_usage(FILE *f)
{
    fprintf(f,
        "usage: ./train                    the main job: fine-tune the shipped model on 15%% of MNIST\n"
        "                                  with plain fine-tuning and with StochCA, print both\n"
        "       ./train finetune [flags]   fine-tune a pretrained checkpoint on MNIST\n"
        "       ./train pretrain [flags]   train a ViT from scratch on Fashion-MNIST\n"
        "       ./train bench [flags]      time inference and training steps on random images\n"
        "                                  (default: patch 4, D 64, L 6, H 4, M 256, batch 64, p 0.5)\n"
        "       ./train tl-sweep [flags]   transfer learning on MNIST: ft, stochca, l2sp,\n"
        "                                  stochca+l2sp and scratch at ratios 0.15, 0.30, 0.50\n"
        "                                  and 1, and StochCA with p 0.1 to 0.9 at ratio 0.15\n"
        "       ./train dg-sweep [flags]   domain generalization on Rotated MNIST: ft and\n"
        "                                  stochca, each rotation left out in turn\n"
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
        "  --epochs E       passes over the training images (default 60 fine-tuning, 10 pretraining)\n"
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
        "                   of every training image; 0 recomputes them every step (default 1024)\n"
        "sweep flags (tl-sweep and dg-sweep also take --steps, --batch, --lr, --wd, --warmup,\n"
        "--l2sp-alpha, --head-lr-scale, --checkpoint, --data, --threads and --kv-cache-mb):\n"
        "  --seeds N        run seeds 0 to N-1 of every setting (default 3)\n"
        "  --steps N        optimizer steps of every run, whatever its ratio (default 400)\n"
        "  --out-dir DIR    folder for the TSV and SVG files, created if missing (default out)\n"
        "  --p P            p of the StochCA runs; tl-sweep defaults to the p of the p sweep\n"
        "                   with the best mean validation accuracy, dg-sweep to 0.1\n"
        "  --eval-every K   dg-sweep: validation accuracy every K steps; the run reports the\n"
        "                   test accuracy at the best one (default 50)\n"
        "tl-sweep validates on a fixed 10%% of every class of the MNIST training split and\n"
        "draws its training subsets from the other 90%%. dg-sweep holds out 20%% of every\n"
        "training domain for validation and tests on the whole held-out domain.\n");
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
    if (!strcmp(flag, "--p")) { o->p_given = 1; return parse_double(flag, value, 0, 1, 0, &o->p); }
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
    if (!strcmp(flag, "--seeds")) return parse_int(flag, value, 1, 1000, &o->seeds);
    if (!strcmp(flag, "--out-dir")) { o->out_dir = value; return 1; }
    if (!strcmp(flag, "--eval-every")) return parse_long(flag, value, 1, 100000000L, &o->eval_every);
    fprintf(stderr, "train: unknown flag '%s'\n\n", flag);
    print_usage(stderr);
    return 0;
}

/* The flags that each command reads. Any other flag is rejected, so that a
   flag that would be ignored (for example --ratio for the main job, which
   always uses 15%) never looks as if it had an effect. */
static const char *const main_job_flags[] = {"--p", "--checkpoint", "--head-lr-scale", "--epochs", "--steps",
                                             "--batch", "--lr", "--wd", "--warmup", "--seed", "--threads",
                                             "--data", "--kv-cache-mb", NULL};
static const char *const finetune_flags[] = {"--method", "--p", "--ratio", "--checkpoint", "--l2sp-alpha",
                                             "--head-lr-scale", "--epochs", "--steps", "--batch", "--lr", "--wd",
                                             "--warmup", "--seed", "--threads", "--data", "--out", "--save-every",
                                             "--resume", "--stop-after", "--kv-cache-mb", NULL};
static const char *const pretrain_flags[] = {"--dim", "--depth", "--heads", "--mlp", "--patch", "--head-lr-scale",
                                             "--epochs", "--steps", "--batch", "--lr", "--wd", "--warmup", "--seed",
                                             "--threads", "--data", "--out", "--save-every", "--resume",
                                             "--stop-after", NULL};
static const char *const bench_flags[] = {"--dim", "--depth", "--heads", "--mlp", "--patch", "--batch", "--p",
                                          "--seed", "--steps", "--threads", "--kv-cache-mb", NULL};
static const char *const tl_sweep_flags[] = {"--seeds", "--steps", "--out-dir", "--p", "--batch", "--lr", "--wd",
                                             "--warmup", "--l2sp-alpha", "--head-lr-scale", "--checkpoint",
                                             "--data", "--threads", "--kv-cache-mb", NULL};
static const char *const dg_sweep_flags[] = {"--seeds", "--steps", "--out-dir", "--p", "--eval-every", "--batch",
                                             "--lr", "--wd", "--warmup", "--l2sp-alpha", "--head-lr-scale",
                                             "--checkpoint", "--data", "--threads", "--kv-cache-mb", NULL};

static int is_listed(const char *const *list, const char *flag)
{
    for (; *list; list++)
        if (!strcmp(*list, flag))
            return 1;
    return 0;
}

/* Each command with its flags; "" is the main job. */
static const struct {
    const char *name;
    const char *const *flags;
} command_table[] = {
    {"", main_job_flags},
    {"finetune", finetune_flags},
    {"pretrain", pretrain_flags},
    {"bench", bench_flags},
    {"tl-sweep", tl_sweep_flags},
    {"dg-sweep", dg_sweep_flags},
};

#define NUM_COMMANDS (int)(sizeof command_table / sizeof command_table[0])

/* Returns the flags of `command`, or those of the main job for a name not in the table. */
static const char *const *command_flags(const char *command)
{
    int i;
    for (i = 0; i < NUM_COMMANDS; i++)
        if (!strcmp(command, command_table[i].name))
            return command_table[i].flags;
    return main_job_flags;
}

/* Returns 1 if some command takes `flag`. */
static int is_known_flag(const char *flag)
{
    int i;
    for (i = 0; i < NUM_COMMANDS; i++)
        if (is_listed(command_table[i].flags, flag))
            return 1;
    return 0;
}

/* Returns 0 after printing a message if `command` does not take `flag`.
   Unknown flags pass here, so that parse_flag prints them with the usage. */
static int check_flag(const char *command, const char *flag)
{
    const char *const *accepted = command_flags(command);
    if (strncmp(flag, "--", 2) != 0) {
        fprintf(stderr, "train: unexpected argument '%s', expected a flag such as --steps\n", flag);
        return 0;
    }
    if (strchr(flag, '=')) {
        fprintf(stderr, "train: invalid flag '%s': give the value after a space, as in --steps 100\n", flag);
        return 0;
    }
    if (is_known_flag(flag) && !is_listed(accepted, flag)) {
        fprintf(stderr, "train: invalid flag '%s' for %s, expected one of:", flag,
                *command ? command : "the main job");
        for (; *accepted; accepted++)
            fprintf(stderr, " %s", *accepted);
        fprintf(stderr, "\n");
        return 0;
    }
    return 1;
}

/* Checks before training that path.tmp, where checkpoints are written
   first, can be created, so that a long run does not end in a failed save. */
static int check_writable(const char *path)
{
    char tmp[4096];
    struct stat info;
    FILE *f;
    if (stat(path, &info) == 0 && S_ISDIR(info.st_mode)) {
        fprintf(stderr, "train: --out '%s' is a folder; give a file name such as %s/model.bin\n", path, path);
        return 0;
    }
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        fprintf(stderr, "train: --out path is too long (%zu characters)\n", strlen(path));
        return 0;
    }
    f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "train: cannot create '%s' for --out; check that the folder exists and is writable\n", tmp);
        return 0;
    }
    fclose(f);
    remove(tmp);
    return 1;
}

static int parse_options(options *o, const char *command, int argc, char **argv)
{
    int i;
    for (i = 0; i < argc; i += 2)
        if (!check_flag(command, argv[i]) || !parse_flag(o, argv[i], i + 1 < argc ? argv[i + 1] : NULL))
            return 0;
    if (o->save_every > 0 && !o->out) {
        fprintf(stderr, "train: --save-every needs --out, the file to save the training state to\n");
        return 0;
    }
    if (o->stop_after > 0 && o->save_every == 0) {
        fprintf(stderr, "train: --stop-after needs --save-every, or there is no saved state to resume from\n");
        return 0;
    }
    return !o->out || check_writable(o->out);
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

/* Training-domain validation, the model selection of DomainBed: the model
   is evaluated on a validation set every `every` steps and after the last
   step, and the parameters with the best validation accuracy are kept
   (the earliest of equal ones). */
typedef struct {
    const dataset *val;
    long every;
    batch_buffers buf;           /* val->count indices, batches of up to `batch` images */
    int batch;
    stochca_real *best_params;   /* (Q) parameters after best_step */
    size_t num_params;
    double best_accuracy;        /* validation accuracy in percent, -1 before the first evaluation */
    long best_step;
} validation_tracker;

static void free_tracker(validation_tracker *t)
{
    free_buffers(&t->buf);
    free(t->best_params);
    memset(t, 0, sizeof *t);
}

/* Prepares a tracker for a model of num_params parameters trained with
   batches of up to `batch` images. Returns 0 after printing a message. */
static int init_tracker(validation_tracker *t, const dataset *val, long every, int batch, size_t num_params)
{
    memset(t, 0, sizeof *t);
    t->val = val;
    t->every = every;
    t->batch = batch;
    t->num_params = num_params;
    t->best_accuracy = -1;
    t->best_params = (stochca_real *)malloc(num_params * sizeof(stochca_real));
    if (!t->best_params) {
        fprintf(stderr, "train: out of memory for a copy of %zu parameters\n", num_params);
        return 0;
    }
    if (!alloc_buffers(&t->buf, val->count, batch, val->rows)) {
        free_tracker(t);
        return 0;
    }
    return 1;
}

/* Evaluates m on the validation set after `step` steps and keeps its
   parameters if they beat every earlier evaluation. m's batch capacity
   must not exceed the tracker's batch. */
static void track_validation(validation_tracker *t, stochca_model *m, long step)
{
    const double accuracy = evaluate(m, t->val, &t->buf);
    if (accuracy > t->best_accuracy) {
        t->best_accuracy = accuracy;
        t->best_step = step;
        memcpy(t->best_params, m->param_memory, t->num_params * sizeof(stochca_real));
    }
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
   L2-SP and may be NULL otherwise. tracker, when not NULL, evaluates the
   model on its validation set every tracker->every steps and after the
   last step. Returns TRAIN_DONE, TRAIN_STOPPED (--stop-after) or
   TRAIN_FAILED after printing a message. */
static int train_model(stochca_model *m, stochca_model *pretrained, const dataset *d, const options *o,
                       const char *label, validation_tracker *tracker)
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
    /* NOTE: the other flags are not stored in the training state, so only
       the step count can be checked against the interrupted run. */
    if (o->resume && m->adam_step >= total) {
        fprintf(stderr, "train: '%s' is at step %ld, but this run has only %ld steps; give the --steps or "
                "--epochs of the interrupted run\n", o->resume, m->adam_step, total);
        return TRAIN_FAILED;
    }
    if (!alloc_buffers(&buf, d->count, B, d->rows))
        return TRAIN_FAILED;
    cache_ready = uses_stochca(o->method) && open_kv_cache(&cache, &m->config, d->count, B, o->kv_cache_mb);

    /* The image order of an epoch depends only on (seed, epoch), so a
       resumed run recomputes it instead of storing it. */
    first_step = m->adam_step;
    if (first_step % steps_per_epoch != 0 && first_step < total)
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
        if (tracker && ((step + 1) % tracker->every == 0 || step + 1 == total))
            track_validation(tracker, m, step + 1);

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
    fprintf(stderr, "train: --data names the folder of the IDX files (default data); data/README.md lists "
            "their sizes and checksums\n");
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
        ok = train_model(&m, NULL, &train, o, "pretrain", NULL);
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
    status = train_model(&target, o->method == METHOD_FT ? NULL : &pre, &train, o, name, NULL);
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
    printf("\nMNIST, %d training images (15%% of the split), %ld %s, seed %ld, checkpoint %s\n",
           r[0].train_images, o.steps > 0 ? o.steps : o.epochs, o.steps > 0 ? "steps" : "epochs", o.seed,
           o.checkpoint);
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
    uint64_t seed;
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

/* Times `kind` for at least BENCH_MIN_SECONDS (or `steps` steps) after a
   warm-up step on each pool batch, which also fills the K/V cache. Every
   case restarts the random cross flags from the same seed, so stochca and
   stochca-cached draw the same flags. Writes images per second of wall time
   and of processor time (summed over threads, so less disturbed by other
   programs), and GFLOP/s of wall time. */
static int bench_case_run(bench_state *s, bench_case kind, long steps, double *images_per_second,
                          double *images_per_cpu_second, double *gflops)
{
    double start, elapsed, flops = 0;
    clock_t cpu_start;
    long n;
    for (n = 0; n < BENCH_POOL_BATCHES; n++)
        if (bench_step(s, kind, (int)n) < 0)
            return 0;
    stochca_rng_seed(&s->rng, s->seed);
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
    s->seed = (uint64_t)o->seed;
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

/* ---------------------------------------------------------------------------
   Sweep runs and their summaries */

#define NO_DOMAIN (-1)      /* run_record.domain of transfer-learning runs */
#define DOMAIN_AVERAGE (-2) /* run_record.domain of a per-seed average over held-out domains */

/* Outcome of one sweep run. */
typedef struct {
    const char *method;   /* ft, stochca, l2sp, stochca+l2sp or scratch */
    double p;             /* StochCA cross-attention probability, 0 for methods without StochCA */
    double ratio;         /* fraction of the training pool (transfer learning), 0 otherwise */
    int domain;           /* held-out rotation angle in degrees, NO_DOMAIN or DOMAIN_AVERAGE */
    long seed;
    long steps;
    long best_step;       /* step of the evaluated parameters: the last step, or the best validation */
    int train_images;
    double val_acc;       /* percent */
    double test_acc;      /* percent */
    double seconds;
} run_record;

/* Runs in the order they finished. */
typedef struct {
    run_record *runs;
    int count, capacity;
} run_table;

static int init_table(run_table *t, int capacity)
{
    t->count = 0;
    t->capacity = capacity;
    t->runs = (run_record *)calloc((size_t)(capacity > 0 ? capacity : 1), sizeof(run_record));
    if (!t->runs)
        fprintf(stderr, "train: out of memory for a table of %d runs\n", capacity);
    return t->runs != NULL;
}

static void free_table(run_table *t)
{
    free(t->runs);
    memset(t, 0, sizeof *t);
}

/* Returns the run of table t with these settings, or NULL. */
static const run_record *find_run(const run_table *t, const char *method, double p, double ratio, int domain,
                                  long seed)
{
    int i;
    for (i = 0; i < t->count; i++) {
        const run_record *r = &t->runs[i];
        if (!strcmp(r->method, method) && r->p == p && r->ratio == ratio && r->domain == domain && r->seed == seed)
            return r;
    }
    return NULL;
}

/* Mean and sample standard deviation (divisor n - 1) of x[0..n-1]. The
   standard deviation is NaN when n < 2, and both are NaN when n == 0. */
static void mean_std(const double *x, int n, double *mean, double *std)
{
    double sum = 0, squares = 0;
    int i;
    for (i = 0; i < n; i++)
        sum += x[i];
    *mean = n > 0 ? sum / n : NAN;
    for (i = 0; i < n; i++)
        squares += (x[i] - *mean) * (x[i] - *mean);
    *std = n > 1 ? sqrt(squares / (n - 1)) : NAN;
}

/* Mean and sample standard deviation over the seeds of one cell: the runs
   that share method, p, ratio and domain. */
typedef struct {
    const char *method;
    double p, ratio;
    int domain;
    int n;                /* number of runs (seeds) */
    double val_mean, val_std, test_mean, test_std;
} summary_cell;

static int same_cell(const run_record *r, const summary_cell *c)
{
    return !strcmp(r->method, c->method) && r->p == c->p && r->ratio == c->ratio && r->domain == c->domain;
}

/* Summarizes the runs of t by cell, in the order in which each cell first
   occurs. cells needs room for t->count entries. Returns the number of
   cells, or -1 after printing a message if out of memory. */
static int summarize_runs(const run_table *t, summary_cell *cells)
{
    double *val = (double *)malloc((size_t)(t->count > 0 ? t->count : 1) * sizeof(double));
    double *test = (double *)malloc((size_t)(t->count > 0 ? t->count : 1) * sizeof(double));
    int count = 0, i, k;

    if (!val || !test) {
        fprintf(stderr, "train: out of memory for the summary of %d runs\n", t->count);
        free(val);
        free(test);
        return -1;
    }
    for (i = 0; i < t->count; i++) {
        const run_record *r = &t->runs[i];
        summary_cell *c = &cells[count];
        for (k = 0; k < count; k++)
            if (same_cell(r, &cells[k]))
                break;
        if (k < count)
            continue;
        memset(c, 0, sizeof *c);
        c->method = r->method;
        c->p = r->p;
        c->ratio = r->ratio;
        c->domain = r->domain;
        for (k = i; k < t->count; k++)
            if (same_cell(&t->runs[k], c)) {
                val[c->n] = t->runs[k].val_acc;
                test[c->n] = t->runs[k].test_acc;
                c->n++;
            }
        mean_std(val, c->n, &c->val_mean, &c->val_std);
        mean_std(test, c->n, &c->test_mean, &c->test_std);
        count++;
    }
    free(val);
    free(test);
    return count;
}

/* Allocates *cells and summarizes t into it. Returns the number of cells,
   or -1 after printing a message if out of memory. */
static int summarize_table(const run_table *t, summary_cell **cells)
{
    *cells = (summary_cell *)malloc((size_t)(t->count > 0 ? t->count : 1) * sizeof **cells);
    if (!*cells) {
        fprintf(stderr, "train: out of memory for the summary of %d runs\n", t->count);
        return -1;
    }
    return summarize_runs(t, *cells);
}

/* Returns the cell with these settings, or NULL. */
static const summary_cell *find_cell(const summary_cell *cells, int count, const char *method, double p,
                                     double ratio, int domain)
{
    int i;
    for (i = 0; i < count; i++)
        if (!strcmp(cells[i].method, method) && cells[i].p == p && cells[i].ratio == ratio &&
            cells[i].domain == domain)
            return &cells[i];
    return NULL;
}

/* ---------------------------------------------------------------------------
   Output files */

/* Creates the folder `path` and its missing parents, as mkdir -p does.
   Returns 0 after printing a message on failure. */
static int make_folder(const char *path)
{
    char partial[1024];
    const size_t length = strlen(path);
    struct stat info;
    size_t i;

    if (length == 0 || length >= sizeof partial) {
        fprintf(stderr, "train: invalid --out-dir '%s', expected 1 to %zu characters\n", path, sizeof partial - 1);
        return 0;
    }
    for (i = 1; i <= length; i++) {
        if (path[i] != '/' && path[i] != '\0')
            continue;
        memcpy(partial, path, i);
        partial[i] = '\0';
        if (mkdir(partial, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "train: cannot create folder '%s': %s\n", partial, strerror(errno));
            return 0;
        }
    }
    if (stat(path, &info) != 0 || !S_ISDIR(info.st_mode)) {
        fprintf(stderr, "train: --out-dir '%s' exists but is not a folder\n", path);
        return 0;
    }
    return 1;
}

/* Opens folder/name for writing and stores the full name in path.
   Returns NULL after printing a message. */
static FILE *open_output(const char *folder, const char *name, char *path, size_t path_size)
{
    FILE *f;
    snprintf(path, path_size, "%s/%s", folder, name);
    f = fopen(path, "w");
    if (!f)
        fprintf(stderr, "train: cannot create '%s': %s\n", path, strerror(errno));
    return f;
}

/* Closes f. Returns 0 after printing a message if any write to it failed. */
static int close_output(FILE *f, const char *path)
{
    const int failed = ferror(f);
    if (fclose(f) != 0 || failed) {
        fprintf(stderr, "train: writing '%s' failed; check that its disk has free space\n", path);
        return 0;
    }
    return 1;
}

/* Writes x with two decimals, or "nan" (a standard deviation of one run). */
static void write_percent(FILE *f, double x)
{
    if (isnan(x))
        fprintf(f, "nan");
    else
        fprintf(f, "%.2f", x);
}

static void write_domain(FILE *f, int domain)
{
    if (domain == DOMAIN_AVERAGE)
        fprintf(f, "avg");
    else
        fprintf(f, "%d", domain);
}

/* Column names of a runs file: transfer learning has a ratio, domain
   generalization a held-out domain and the selected step. */
static void write_runs_header(FILE *f, int domains)
{
    fprintf(f, domains ? "method\tp\ttest_domain\tseed\tsteps\tbest_step\ttrain_images\tval_acc\ttest_acc\tseconds\n"
                       : "method\tp\tratio\tseed\tsteps\ttrain_images\tval_acc\ttest_acc\tseconds\n");
}

/* Appends one run to a runs file and flushes it, so an interrupted sweep
   keeps every finished run. */
static void write_run_row(FILE *f, const run_record *r, int domains)
{
    fprintf(f, "%s\t%g\t", r->method, r->p);
    if (domains)
        fprintf(f, "%d\t%ld\t%ld\t%ld\t", r->domain, r->seed, r->steps, r->best_step);
    else
        fprintf(f, "%.2f\t%ld\t%ld\t", r->ratio, r->seed, r->steps);
    fprintf(f, "%d\t%.2f\t%.2f\t%.1f\n", r->train_images, r->val_acc, r->test_acc, r->seconds);
    fflush(f);
}

/* Writes folder/name: one row per cell with the mean and sample standard
   deviation over seeds. Returns 0 after printing a message. */
static int write_summary(const char *folder, const char *name, const summary_cell *cells, int count, int domains)
{
    char path[1100];
    FILE *f = open_output(folder, name, path, sizeof path);
    int i;

    if (!f)
        return 0;
    fprintf(f, "method\tp\t%s\tseeds\tval_mean\tval_std\ttest_mean\ttest_std\n", domains ? "test_domain" : "ratio");
    for (i = 0; i < count; i++) {
        const summary_cell *c = &cells[i];
        fprintf(f, "%s\t%g\t", c->method, c->p);
        if (domains)
            write_domain(f, c->domain);
        else
            fprintf(f, "%.2f", c->ratio);
        fprintf(f, "\t%d\t", c->n);
        write_percent(f, c->val_mean);
        fprintf(f, "\t");
        write_percent(f, c->val_std);
        fprintf(f, "\t");
        write_percent(f, c->test_mean);
        fprintf(f, "\t");
        write_percent(f, c->test_std);
        fprintf(f, "\n");
    }
    return close_output(f, path);
}

/* ---------------------------------------------------------------------------
   SVG figures, written element by element with fprintf */

#define FIGURE_WIDTH 760
#define FIGURE_HEIGHT 460
#define FIGURE_LEFT 70     /* room for the y tick labels and title */
#define FIGURE_TOP 40      /* room for the title */
#define FIGURE_RIGHT 200   /* room for the legend */
#define FIGURE_BOTTOM 60   /* room for the x tick labels and title */

static const char *const series_colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f", "#ff7f0e"};

/* A figure with one plot area, which maps data coordinates (x to the
   right, y up) to SVG user units (y down). */
typedef struct {
    FILE *f;
    double x_min, x_max, y_min, y_max;  /* data range of the plot area */
    double left, top, width, height;    /* plot area in user units */
    int legend_rows;
} svg_figure;

static double figure_x(const svg_figure *g, double x)
{
    return g->left + (x - g->x_min) / (g->x_max - g->x_min) * g->width;
}

static double figure_y(const svg_figure *g, double y)
{
    return g->top + (g->y_max - y) / (g->y_max - g->y_min) * g->height;
}

/* Picks a y range of whole ticks around [low, high], clipped to [0, 100],
   and the tick step: 2, 5 or 10 percentage points. */
static void accuracy_range(double low, double high, double *y_min, double *y_max, double *step)
{
    const double span = high - low;
    if (span <= 8)
        *step = 2;
    else if (span <= 25)
        *step = 5;
    else
        *step = 10;
    *y_min = floor(low / *step) * *step;
    *y_max = ceil(high / *step) * *step;
    if (*y_min < 0)
        *y_min = 0;
    if (*y_max > 100)
        *y_max = 100;
    if (*y_max <= *y_min)
        *y_max = *y_min + *step;
}

/* Writes the SVG header, a white background and the title. */
static void figure_begin(svg_figure *g, FILE *f, const char *title, double x_min, double x_max, double y_min,
                         double y_max)
{
    g->f = f;
    g->x_min = x_min;
    g->x_max = x_max;
    g->y_min = y_min;
    g->y_max = y_max;
    g->left = FIGURE_LEFT;
    g->top = FIGURE_TOP;
    g->width = FIGURE_WIDTH - FIGURE_LEFT - FIGURE_RIGHT;
    g->height = FIGURE_HEIGHT - FIGURE_TOP - FIGURE_BOTTOM;
    g->legend_rows = 0;
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n",
            FIGURE_WIDTH, FIGURE_HEIGHT, FIGURE_WIDTH, FIGURE_HEIGHT);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", FIGURE_WIDTH, FIGURE_HEIGHT);
    fprintf(f, "<text x=\"%d\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">%s</text>\n", FIGURE_WIDTH / 2, title);
}

/* Draws the frame, a grid line and label every y_step, the labels of the
   x ticks and both axis titles. */
static void figure_axes(const svg_figure *g, int x_count, const double *x_ticks, const char *const *x_labels,
                        double y_step, const char *x_title, const char *y_title)
{
    const double bottom = g->top + g->height;
    double y;
    int i;

    for (y = g->y_min; y <= g->y_max + 1e-9; y += y_step) {
        fprintf(g->f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#dddddd\"/>\n", g->left,
                figure_y(g, y), g->left + g->width, figure_y(g, y));
        fprintf(g->f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", g->left - 6, figure_y(g, y) + 4,
                y);
    }
    for (i = 0; i < x_count; i++)
        fprintf(g->f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", figure_x(g, x_ticks[i]),
                bottom + 18, x_labels[i]);
    fprintf(g->f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"black\"/>\n",
            g->left, g->top, g->width, g->height);
    fprintf(g->f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", g->left + g->width / 2,
            bottom + 42, x_title);
    fprintf(g->f, "<text transform=\"translate(18 %.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
            g->top + g->height / 2, y_title);
}

/* Draws a vertical error bar from mean - std to mean + std with caps.
   Draws nothing when std is NaN (a single seed) or 0. */
static void figure_error_bar(const svg_figure *g, double x, double mean, double std, const char *color)
{
    const double px = figure_x(g, x), low = figure_y(g, mean - std), high = figure_y(g, mean + std);
    if (!(std > 0))
        return;
    fprintf(g->f, "<path d=\"M%.1f %.1fV%.1fM%.1f %.1fH%.1fM%.1f %.1fH%.1f\" stroke=\"%s\" fill=\"none\"/>\n", px,
            low, high, px - 4, low, px + 4, px - 4, high, px + 4, color);
}

/* Draws a line through the points (x[i], mean[i]) with a marker and an
   error bar of +- std[i] at each. Points with a NaN mean are left out. */
static void figure_series(const svg_figure *g, const char *color, int dashed, int n, const double *x,
                          const double *mean, const double *std)
{
    int i, first = 1;
    fprintf(g->f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s points=\"", color,
            dashed ? " stroke-dasharray=\"6 4\"" : "");
    for (i = 0; i < n; i++)
        if (!isnan(mean[i])) {
            fprintf(g->f, "%s%.1f,%.1f", first ? "" : " ", figure_x(g, x[i]), figure_y(g, mean[i]));
            first = 0;
        }
    fprintf(g->f, "\"/>\n");
    for (i = 0; i < n; i++)
        if (!isnan(mean[i])) {
            figure_error_bar(g, x[i], mean[i], std[i], color);
            fprintf(g->f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", figure_x(g, x[i]),
                    figure_y(g, mean[i]), color);
        }
}

/* Draws a bar from the bottom of the plot area to mean, centered on x,
   with an error bar. */
static void figure_bar(const svg_figure *g, double x, double bar_width, double mean, double std, const char *color)
{
    const double left = figure_x(g, x - bar_width / 2), right = figure_x(g, x + bar_width / 2);
    const double top = figure_y(g, mean), bottom = figure_y(g, g->y_min);
    if (isnan(mean))
        return;
    fprintf(g->f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\" fill-opacity=\"0.8\"/>\n",
            left, top, right - left, bottom - top, color);
    figure_error_bar(g, x, mean, std, "black");
}

/* Draws a horizontal or vertical reference line across the plot area. */
static void figure_reference_line(const svg_figure *g, int vertical, double at, const char *color)
{
    if (vertical)
        fprintf(g->f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-dasharray=\"2 3\"/>\n",
                figure_x(g, at), g->top, figure_x(g, at), g->top + g->height, color);
    else
        fprintf(g->f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-dasharray=\"6 4\"/>\n",
                g->left, figure_y(g, at), g->left + g->width, figure_y(g, at), color);
}

/* Adds a row to the legend to the right of the plot area. */
static void figure_legend(svg_figure *g, const char *color, const char *label, int dashed)
{
    const double x = g->left + g->width + 16, y = g->top + 10 + 20 * g->legend_rows++;
    fprintf(g->f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"%s/>\n", x, y,
            x + 24, y, color, dashed ? " stroke-dasharray=\"6 4\"" : "");
    fprintf(g->f, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", x + 30, y + 4, label);
}

static void figure_end(svg_figure *g)
{
    fprintf(g->f, "</svg>\n");
}

/* ---------------------------------------------------------------------------
   Sweeps: shared parts */

/* Data, model and files shared by the runs of one sweep. */
typedef struct {
    options o;                 /* the flags, with method, p, ratio and seed set per run */
    stochca_model pre;         /* the pretrained checkpoint, frozen */
    dataset pool, val, test;   /* tl-sweep: training pool, validation set, MNIST test split */
    rotated_mnist rotated;     /* dg-sweep: all digits as six rotated domains */
    FILE *runs_file, *p_runs_file;
    char runs_path[1100], p_runs_path[1100];
    int done, total;           /* runs started and planned, for progress labels */
} sweep;

/* Frees the data and model of a sweep and closes its runs files. Returns 0
   after printing a message if a write to a runs file failed. */
static int close_sweep(sweep *s)
{
    int ok = 1;
    if (s->runs_file)
        ok = close_output(s->runs_file, s->runs_path);
    if (s->p_runs_file)
        ok = close_output(s->p_runs_file, s->p_runs_path) && ok;
    stochca_model_free(&s->pre);
    free_dataset(&s->pool);
    free_dataset(&s->val);
    free_dataset(&s->test);
    free_rotated_mnist(&s->rotated);
    memset(s, 0, sizeof *s);
    return ok;
}

/* Creates the output folder and opens folder/name as a runs file with its
   header. Returns NULL after printing a message. */
static FILE *open_runs_file(const options *o, const char *name, char *path, size_t path_size, int domains)
{
    FILE *f = open_output(o->out_dir, name, path, path_size);
    if (f)
        write_runs_header(f, domains);
    return f;
}

/* Builds the model of one run: the pretrained backbone with a new head or,
   for scratch, a random initialization of the same shape seeded with seed. */
static int init_run_model(stochca_model *m, const stochca_model *pre, int scratch, long seed)
{
    stochca_config c = pre->config;
    stochca_error err;
    stochca_rng rng;
    int status;

    c.classes = DATA_CLASSES;
    if (scratch) {
        status = stochca_model_init(m, &c, &err);
        if (status == STOCHCA_OK) {
            stochca_rng_seed(&rng, (uint64_t)seed);
            stochca_model_init_random(m, &rng);
        }
    } else {
        status = stochca_model_init_transfer(m, pre, DATA_CLASSES, &err);
    }
    if (status != STOCHCA_OK)
        fprintf(stderr, "train: %s\n", err.message);
    return status == STOCHCA_OK;
}

/* Writes the progress label of the next run of s, such as
   "[3/72] stochca p=0.3 ratio 0.15 seed 1". */
static void run_label(char *label, size_t size, sweep *s, const run_record *r)
{
    char p[32] = "", where[48];
    if (r->p > 0)
        snprintf(p, sizeof p, " p=%g", r->p);
    if (r->domain == NO_DOMAIN)
        snprintf(where, sizeof where, "ratio %.2f", r->ratio);
    else
        snprintf(where, sizeof where, "held-out %d deg", r->domain);
    snprintf(label, size, "[%d/%d] %s%s %s seed %ld", ++s->done, s->total, r->method, p, where, r->seed);
}

static void print_run_result(const run_record *r)
{
    fprintf(stderr, "  validation %.2f%%, test %.2f%% (%d training images, step %ld, %.0f s)\n", r->val_acc,
            r->test_acc, r->train_images, r->best_step, r->seconds);
}

/* Widens [*low, *high] to contain mean +- std. A NaN std counts as 0. */
static void include_range(double mean, double std, double *low, double *high)
{
    const double spread = isnan(std) ? 0 : std;
    if (isnan(mean))
        return;
    if (mean - spread < *low)
        *low = mean - spread;
    if (mean + spread > *high)
        *high = mean + spread;
}

/* Returns "s" unless n is 1, for "%d seed%s". */
static const char *plural(int n)
{
    return n == 1 ? "" : "s";
}

/* Prints "mean (std)" of a cell, or dashes for a missing cell or std. */
static void print_mean_std(double mean, double std)
{
    if (isnan(mean))
        printf("  %14s", "-");
    else if (isnan(std))
        printf("  %6.2f (    -)", mean);
    else
        printf("  %6.2f (%5.2f)", mean, std);
}

/* ---------------------------------------------------------------------------
   Transfer-learning sweep (tl-sweep)

   A fixed validation set, TL_VALIDATION_FRACTION of every class of the
   MNIST training split, is removed before any training subset is drawn.
   The ratios are fractions of the remaining pool, so no training image of
   any seed or ratio is a validation image. Every run trains for the same
   number of steps whatever its ratio. The p sweep picks p by mean
   validation accuracy. Test accuracy is only reported. */

#define TL_VALIDATION_FRACTION 0.1
#define TL_VALIDATION_SEED 1     /* seed of the validation split, the same for every run */
#define TL_P_SWEEP_RATIO 0.15
#define TL_RATIOS 4
#define TL_P_VALUES 5
#define TL_METHODS 5             /* the four fine-tuning methods, then scratch */
#define TL_SCRATCH 4

static const double tl_ratios[TL_RATIOS] = {0.15, 0.30, 0.50, 1.00};
static const char *const tl_ratio_labels[TL_RATIOS] = {"0.15", "0.30", "0.50", "1.00"};
static const double tl_p_values[TL_P_VALUES] = {0.1, 0.3, 0.5, 0.7, 0.9};
static const char *const tl_p_labels[TL_P_VALUES] = {"0.1", "0.3", "0.5", "0.7", "0.9"};
/* The first four are method_names in method_kind order. */
static const char *const tl_method_names[TL_METHODS] = {"ft", "stochca", "l2sp", "stochca+l2sp", "scratch"};

/* Splits the MNIST training split into the fixed validation set and the
   training pool. Returns 0 after printing a message. */
static int split_validation(const dataset *full, dataset *pool, dataset *val)
{
    const size_t size = (size_t)(full->count > 0 ? full->count : 1) * sizeof(int);
    int *all = identity_indices(full->count), *picked = (int *)malloc(size), *rest = (int *)malloc(size);
    int picked_count = 0, rest_count = 0, ok;

    memset(pool, 0, sizeof *pool);
    memset(val, 0, sizeof *val);
    ok = all && picked && rest &&
         split_by_class(full, all, full->count, TL_VALIDATION_FRACTION, TL_VALIDATION_SEED, picked, &picked_count,
                        rest, &rest_count) &&
         gather_images(full, picked, picked_count, val) && gather_images(full, rest, rest_count, pool);
    if (!ok) {
        fprintf(stderr, "train: out of memory for the validation split\n");
        free_dataset(pool);
        free_dataset(val);
    }
    free(all);
    free(picked);
    free(rest);
    return ok;
}

/* Loads the data and the checkpoint of tl-sweep, creates the output
   folder and opens both runs files. Returns 0 after printing a message. */
static int open_tl_sweep(sweep *s, const options *o)
{
    dataset full;
    int ok;

    memset(s, 0, sizeof *s);
    s->o = *o;
    if (!make_folder(o->out_dir) || !load_split(&full, o->data_dir, "mnist", "train", 28))
        return 0;
    ok = split_validation(&full, &s->pool, &s->val);
    free_dataset(&full);
    if (!ok || !load_split(&s->test, o->data_dir, "mnist", "test", 28) || !load_pretrained(&s->pre, o->checkpoint, 28))
        return 0;
    s->runs_file = open_runs_file(o, "tl-runs.tsv", s->runs_path, sizeof s->runs_path, 0);
    s->p_runs_file = open_runs_file(o, "tl-p-runs.tsv", s->p_runs_path, sizeof s->p_runs_path, 0);
    if (!s->runs_file || !s->p_runs_file)
        return 0;
    fprintf(stderr, "MNIST: %d validation images, a training pool of %d, %d test images\n", s->val.count,
            s->pool.count, s->test.count);
    return 1;
}

/* Trains method `kind` (an index of tl_method_names) on `ratio` of the
   training pool and measures validation and test accuracy after the last
   step. */
static int tl_run(sweep *s, int kind, double p, double ratio, long seed, run_record *r)
{
    const int scratch = kind == TL_SCRATCH;
    options o = s->o;
    dataset train;
    stochca_model m;
    char label[160];
    double start = now_seconds();
    int ok = 0;

    o.method = scratch ? METHOD_FT : (method_kind)kind;
    o.p = p;
    o.ratio = ratio;
    o.seed = seed;
    memset(&m, 0, sizeof m);
    memset(r, 0, sizeof *r);
    r->method = tl_method_names[kind];
    r->p = uses_stochca(o.method) ? p : 0;
    r->ratio = ratio;
    r->domain = NO_DOMAIN;
    r->seed = seed;
    r->steps = r->best_step = o.steps;
    if (!make_subset(&s->pool, ratio, (uint64_t)seed, &train)) {
        fprintf(stderr, "train: out of memory for the training subset\n");
        return 0;
    }
    r->train_images = train.count;
    run_label(label, sizeof label, s, r);
    if (init_run_model(&m, &s->pre, scratch, seed) &&
        train_model(&m, o.method == METHOD_FT ? NULL : &s->pre, &train, &o, label, NULL) == TRAIN_DONE) {
        r->val_acc = test_accuracy(&m, &s->val);
        r->test_acc = test_accuracy(&m, &s->test);
        r->seconds = now_seconds() - start;
        ok = r->val_acc >= 0 && r->test_acc >= 0;
    }
    stochca_model_free(&m);
    free_dataset(&train);
    if (ok)
        print_run_result(r);
    return ok;
}

/* Runs StochCA at ratio TL_P_SWEEP_RATIO for every p and seed. */
static int run_p_sweep(sweep *s, run_table *p_runs)
{
    long seed;
    int i;
    for (i = 0; i < TL_P_VALUES; i++)
        for (seed = 0; seed < s->o.seeds; seed++) {
            run_record *r = &p_runs->runs[p_runs->count];
            if (!tl_run(s, METHOD_STOCHCA, tl_p_values[i], TL_P_SWEEP_RATIO, seed, r))
                return 0;
            p_runs->count++;
            write_run_row(s->p_runs_file, r, 0);
        }
    return 1;
}

/* Returns the p of the p sweep with the best mean validation accuracy, the
   smallest p among equal ones. Test accuracy plays no part in the choice. */
static double choose_p(const summary_cell *cells, int count)
{
    double best_p = tl_p_values[0], best = -1;
    int i;
    for (i = 0; i < count; i++)
        if (cells[i].val_mean > best) {
            best = cells[i].val_mean;
            best_p = cells[i].p;
        }
    return best_p;
}

/* Runs every method and scratch at every ratio and seed, StochCA with p.
   A StochCA run that the p sweep already made with the same p, ratio and
   seed is copied instead of trained again, because training is
   deterministic and would give the same numbers. */
static int run_tl_grid(sweep *s, double p, const run_table *p_runs, run_table *runs)
{
    long seed;
    int i, kind;
    for (seed = 0; seed < s->o.seeds; seed++)
        for (i = 0; i < TL_RATIOS; i++)
            for (kind = 0; kind < TL_METHODS; kind++) {
                run_record *r = &runs->runs[runs->count];
                const run_record *earlier =
                    kind == METHOD_STOCHCA ? find_run(p_runs, "stochca", p, tl_ratios[i], NO_DOMAIN, seed) : NULL;
                if (earlier)
                    *r = *earlier;
                else if (!tl_run(s, kind, p, tl_ratios[i], seed, r))
                    return 0;
                runs->count++;
                write_run_row(s->runs_file, r, 0);
            }
    return 1;
}

/* Returns p for the StochCA methods and 0 for the others. */
static double method_p(int kind, double p)
{
    return kind == METHOD_STOCHCA || kind == METHOD_STOCHCA_L2SP ? p : 0;
}

/* Writes tl-accuracy.svg: test accuracy against the training fraction,
   one line per method, error bars of one sample standard deviation. Each
   method's points are shifted sideways by a little, so that error bars at
   the same ratio do not hide each other. */
static int write_tl_figure(const sweep *s, const summary_cell *cells, int count, double p)
{
    const double shift = 0.012;   /* in units of the training fraction */
    char path[1100], title[160], legend[64];
    double low = 100, high = 0, y_min, y_max, step, x[TL_RATIOS], mean[TL_RATIOS], std[TL_RATIOS];
    FILE *f = open_output(s->o.out_dir, "tl-accuracy.svg", path, sizeof path);
    svg_figure g;
    int i, kind;

    if (!f)
        return 0;
    for (i = 0; i < count; i++)
        include_range(cells[i].test_mean, cells[i].test_std, &low, &high);
    accuracy_range(low, high, &y_min, &y_max, &step);
    snprintf(title, sizeof title, "MNIST test accuracy after %ld steps (mean &#177; sample std, %d seed%s)",
             s->o.steps, s->o.seeds, plural(s->o.seeds));
    figure_begin(&g, f, title, 0, 1.05, y_min, y_max);
    figure_axes(&g, TL_RATIOS, tl_ratios, tl_ratio_labels, step, "fraction of the MNIST training pool",
                "test accuracy (%)");
    for (kind = 0; kind < TL_METHODS; kind++) {
        for (i = 0; i < TL_RATIOS; i++) {
            const summary_cell *c = find_cell(cells, count, tl_method_names[kind], method_p(kind, p), tl_ratios[i],
                                              NO_DOMAIN);
            x[i] = tl_ratios[i] + (kind - (TL_METHODS - 1) / 2.0) * shift;
            mean[i] = c ? c->test_mean : NAN;
            std[i] = c ? c->test_std : NAN;
        }
        figure_series(&g, series_colors[kind], kind == TL_SCRATCH, TL_RATIOS, x, mean, std);
        if (method_p(kind, p) > 0)
            snprintf(legend, sizeof legend, "%s (p = %g)", tl_method_names[kind], p);
        else
            snprintf(legend, sizeof legend, "%s", tl_method_names[kind]);
        figure_legend(&g, series_colors[kind], legend, kind == TL_SCRATCH);
    }
    figure_end(&g);
    return close_output(f, path);
}

/* Writes tl-p.svg: validation and test accuracy of StochCA against p at
   ratio TL_P_SWEEP_RATIO, with plain fine-tuning at that ratio as a
   dashed line and the chosen p as a dotted line. */
static int write_p_figure(const sweep *s, const summary_cell *p_cells, int p_count, const summary_cell *ft,
                          double chosen_p)
{
    char path[1100], title[160], legend[64];
    double low = 100, high = 0, y_min, y_max, step;
    double val[TL_P_VALUES], val_std[TL_P_VALUES], test[TL_P_VALUES], test_std[TL_P_VALUES];
    FILE *f = open_output(s->o.out_dir, "tl-p.svg", path, sizeof path);
    svg_figure g;
    int i;

    if (!f)
        return 0;
    for (i = 0; i < TL_P_VALUES; i++) {
        const summary_cell *c = find_cell(p_cells, p_count, "stochca", tl_p_values[i], TL_P_SWEEP_RATIO, NO_DOMAIN);
        val[i] = c ? c->val_mean : NAN;
        val_std[i] = c ? c->val_std : NAN;
        test[i] = c ? c->test_mean : NAN;
        test_std[i] = c ? c->test_std : NAN;
        include_range(val[i], val_std[i], &low, &high);
        include_range(test[i], test_std[i], &low, &high);
    }
    if (ft)
        include_range(ft->test_mean, 0, &low, &high);
    accuracy_range(low, high, &y_min, &y_max, &step);
    snprintf(title, sizeof title, "StochCA on %.0f%% of the MNIST pool against p (mean &#177; sample std, %d seed%s)",
             100 * TL_P_SWEEP_RATIO, s->o.seeds, plural(s->o.seeds));
    figure_begin(&g, f, title, 0, 1, y_min, y_max);
    figure_axes(&g, TL_P_VALUES, tl_p_values, tl_p_labels, step, "cross-attention probability p", "accuracy (%)");
    figure_series(&g, series_colors[0], 0, TL_P_VALUES, tl_p_values, val, val_std);
    figure_legend(&g, series_colors[0], "validation", 0);
    figure_series(&g, series_colors[1], 0, TL_P_VALUES, tl_p_values, test, test_std);
    figure_legend(&g, series_colors[1], "test", 0);
    if (ft && !isnan(ft->test_mean)) {
        figure_reference_line(&g, 0, ft->test_mean, series_colors[4]);
        figure_legend(&g, series_colors[4], "ft test (p = 0)", 1);
    }
    figure_reference_line(&g, 1, chosen_p, "black");
    snprintf(legend, sizeof legend, "chosen p = %g", chosen_p);
    figure_legend(&g, "black", legend, 1);
    figure_end(&g);
    return close_output(f, path);
}

static void print_p_table(const sweep *s, const summary_cell *p_cells, int p_count)
{
    int i;
    printf("\np sweep: StochCA on %.0f%% of the MNIST training pool, accuracy in %%, mean (sample std) over %d "
           "seed%s\n%-6s  %14s  %14s\n", 100 * TL_P_SWEEP_RATIO, s->o.seeds, plural(s->o.seeds), "p", "validation",
           "test");
    for (i = 0; i < p_count; i++) {
        printf("%-6g", p_cells[i].p);
        print_mean_std(p_cells[i].val_mean, p_cells[i].val_std);
        print_mean_std(p_cells[i].test_mean, p_cells[i].test_std);
        printf("\n");
    }
}

static void print_tl_table(const sweep *s, const summary_cell *cells, int count, double p)
{
    char name[64];
    int i, kind;
    printf("\nMNIST test accuracy in %%, mean (sample std) over %d seed%s, %ld steps of batch %d\n%-20s",
           s->o.seeds, plural(s->o.seeds), s->o.steps, s->o.batch, "method \\ ratio");
    for (i = 0; i < TL_RATIOS; i++)
        printf("  %14s", tl_ratio_labels[i]);
    printf("\n");
    for (kind = 0; kind < TL_METHODS; kind++) {
        if (method_p(kind, p) > 0)
            snprintf(name, sizeof name, "%s p=%g", tl_method_names[kind], p);
        else
            snprintf(name, sizeof name, "%s", tl_method_names[kind]);
        printf("%-20s", name);
        for (i = 0; i < TL_RATIOS; i++) {
            const summary_cell *c = find_cell(cells, count, tl_method_names[kind], method_p(kind, p), tl_ratios[i],
                                              NO_DOMAIN);
            print_mean_std(c ? c->test_mean : NAN, c ? c->test_std : NAN);
        }
        printf("\n");
    }
}

/* Writes the chosen p to tl-chosen-p.txt, for dg-sweep --p. */
static int write_chosen_p(const sweep *s, double p)
{
    char path[1100];
    FILE *f = open_output(s->o.out_dir, "tl-chosen-p.txt", path, sizeof path);
    if (!f)
        return 0;
    fprintf(f, "%g\n", p);
    return close_output(f, path);
}

/* Writes the summaries and figures of the grid and the p sweep and prints
   the grid's table. */
static int write_tl_results(const sweep *s, const run_table *runs, const summary_cell *p_cells, int p_count,
                            double chosen_p, double p)
{
    summary_cell *cells = NULL;
    const int count = summarize_table(runs, &cells);
    const summary_cell *ft = count >= 0 ? find_cell(cells, count, "ft", 0, TL_P_SWEEP_RATIO, NO_DOMAIN) : NULL;
    const int ok = count >= 0 && write_summary(s->o.out_dir, "tl-summary.tsv", cells, count, 0) &&
                   write_summary(s->o.out_dir, "tl-p-summary.tsv", p_cells, p_count, 0) &&
                   write_tl_figure(s, cells, count, p) && write_p_figure(s, p_cells, p_count, ft, chosen_p);
    if (ok) {
        print_tl_table(s, cells, count, p);
        printf("\nwrote tl-runs.tsv, tl-summary.tsv, tl-p-runs.tsv, tl-p-summary.tsv, tl-chosen-p.txt, "
               "tl-accuracy.svg and tl-p.svg to %s\n", s->o.out_dir);
    }
    free(cells);
    return ok;
}

/* Returns 1 if p is one of the p values of the p sweep. */
static int in_p_sweep(double p)
{
    int i;
    for (i = 0; i < TL_P_VALUES; i++)
        if (tl_p_values[i] == p)
            return 1;
    return 0;
}

/* The transfer-learning sweep: the p sweep, the choice of p, then every
   method and scratch at every ratio. */
static int cmd_tl_sweep(const options *o)
{
    const int seeds = o->seeds, reused = !o->p_given || in_p_sweep(o->p) ? seeds : 0;
    sweep s;
    run_table runs, p_runs;
    summary_cell *p_cells = NULL;
    double chosen_p = 0, p = 0;
    int p_count = -1, ok;

    memset(&runs, 0, sizeof runs);
    memset(&p_runs, 0, sizeof p_runs);
    ok = open_tl_sweep(&s, o) && init_table(&p_runs, TL_P_VALUES * seeds) &&
         init_table(&runs, TL_METHODS * TL_RATIOS * seeds);
    s.total = TL_P_VALUES * seeds + TL_METHODS * TL_RATIOS * seeds - reused;
    ok = ok && run_p_sweep(&s, &p_runs);
    if (ok) {
        p_count = summarize_table(&p_runs, &p_cells);
        ok = p_count > 0;
    }
    if (ok) {
        chosen_p = choose_p(p_cells, p_count);
        p = o->p_given ? o->p : chosen_p;
        print_p_table(&s, p_cells, p_count);
        printf("chosen p = %g (best mean validation accuracy at ratio %.2f); the grid uses p = %g%s\n", chosen_p,
               TL_P_SWEEP_RATIO, p, o->p_given ? " from --p" : "");
        fflush(stdout);
        ok = write_chosen_p(&s, chosen_p) && run_tl_grid(&s, p, &p_runs, &runs) &&
             write_tl_results(&s, &runs, p_cells, p_count, chosen_p, p);
    }
    free(p_cells);
    free_table(&runs);
    free_table(&p_runs);
    return close_sweep(&s) && ok;
}

/* ---------------------------------------------------------------------------
   Domain-generalization sweep (dg-sweep) on Rotated MNIST

   Leave one domain out: train on five rotated domains, test on the sixth.
   Model selection is DomainBed's training-domain validation: a stratified
   DG_VALIDATION_FRACTION of every training domain is held out, the model
   is evaluated on it every --eval-every steps, and the run reports the
   test accuracy of the parameters with the best validation accuracy.
   NOTE: DomainBed reports the test accuracy on 80% of the held-out domain
   (its "in" split); here it is all images of the held-out domain. */

#define DG_METHODS 2
#define DG_GROUPS (DOMAIN_COUNT + 1)   /* the held-out domains, then their average */

static const method_kind dg_methods[DG_METHODS] = {METHOD_FT, METHOD_STOCHCA};
static const char *const dg_group_labels[DG_GROUPS] = {"0&#176;", "15&#176;", "30&#176;", "45&#176;", "60&#176;",
                                                       "75&#176;", "avg"};

/* Loads MNIST, builds Rotated MNIST, loads the checkpoint, creates the
   output folder and opens the runs file. Returns 0 after printing a message. */
static int open_dg_sweep(sweep *s, const options *o)
{
    dataset train, test;
    int ok;

    memset(s, 0, sizeof *s);
    s->o = *o;
    if (!make_folder(o->out_dir) || !load_split(&train, o->data_dir, "mnist", "train", 28))
        return 0;
    ok = load_split(&test, o->data_dir, "mnist", "test", 28) && build_rotated_mnist(&train, &test, &s->rotated);
    free_dataset(&train);
    free_dataset(&test);
    if (!ok || !load_pretrained(&s->pre, o->checkpoint, 28))
        return 0;
    s->runs_file = open_runs_file(o, "dg-runs.tsv", s->runs_path, sizeof s->runs_path, 1);
    if (!s->runs_file)
        return 0;
    fprintf(stderr, "Rotated MNIST: %d digits in %d domains\n", s->rotated.images.count, DOMAIN_COUNT);
    return 1;
}

/* Gathers the train, val and test images of one leave-one-domain-out run.
   Returns 0 after printing a message. */
static int make_domain_datasets(const rotated_mnist *r, int test_domain, long seed, dataset *train, dataset *val,
                                dataset *test)
{
    const size_t size = (size_t)r->images.count * sizeof(int);
    int *train_index = (int *)malloc(size), *val_index = (int *)malloc(size), *test_index = (int *)malloc(size);
    int train_count, val_count, test_count, ok;

    memset(train, 0, sizeof *train);
    memset(val, 0, sizeof *val);
    memset(test, 0, sizeof *test);
    ok = train_index && val_index && test_index &&
         split_domains(r, test_domain, seed, train_index, &train_count, val_index, &val_count, test_index,
                       &test_count) &&
         gather_images(&r->images, train_index, train_count, train) &&
         gather_images(&r->images, val_index, val_count, val) && gather_images(&r->images, test_index, test_count, test);
    if (!ok) {
        fprintf(stderr, "train: out of memory for the domain split\n");
        free_dataset(train);
        free_dataset(val);
        free_dataset(test);
    }
    free(train_index);
    free(val_index);
    free(test_index);
    return ok;
}

/* Trains method on every domain but test_domain and measures the held-out
   domain with the parameters of the best validation accuracy. */
static int dg_run(sweep *s, method_kind method, int test_domain, long seed, run_record *r)
{
    options o = s->o;
    dataset train, val, test;
    stochca_model m;
    validation_tracker tracker;
    char label[160];
    double start = now_seconds();
    int ok;

    o.method = method;
    o.seed = seed;
    memset(&m, 0, sizeof m);
    memset(&tracker, 0, sizeof tracker);
    memset(r, 0, sizeof *r);
    r->method = method_names[method];
    r->p = uses_stochca(method) ? o.p : 0;
    r->domain = domain_angles[test_domain];
    r->seed = seed;
    r->steps = o.steps;
    if (!make_domain_datasets(&s->rotated, test_domain, seed, &train, &val, &test))
        return 0;
    r->train_images = train.count;
    run_label(label, sizeof label, s, r);
    ok = init_run_model(&m, &s->pre, 0, seed) && init_tracker(&tracker, &val, o.eval_every, o.batch, m.num_params) &&
         train_model(&m, method == METHOD_FT ? NULL : &s->pre, &train, &o, label, &tracker) == TRAIN_DONE;
    if (ok) {
        memcpy(m.param_memory, tracker.best_params, m.num_params * sizeof(stochca_real));
        r->best_step = tracker.best_step;
        r->val_acc = tracker.best_accuracy;
        r->test_acc = test_accuracy(&m, &test);
        r->seconds = now_seconds() - start;
        ok = r->test_acc >= 0;
    }
    free_tracker(&tracker);
    stochca_model_free(&m);
    free_dataset(&train);
    free_dataset(&val);
    free_dataset(&test);
    if (ok)
        print_run_result(r);
    return ok;
}

/* Runs every method with every held-out domain and seed. */
static int run_dg_grid(sweep *s, run_table *runs)
{
    long seed;
    int domain, k;
    for (seed = 0; seed < s->o.seeds; seed++)
        for (domain = 0; domain < DOMAIN_COUNT; domain++)
            for (k = 0; k < DG_METHODS; k++) {
                run_record *r = &runs->runs[runs->count];
                if (!dg_run(s, dg_methods[k], domain, seed, r))
                    return 0;
                runs->count++;
                write_run_row(s->runs_file, r, 1);
            }
    return 1;
}

/* Appends, for every method and seed, a record with domain DOMAIN_AVERAGE
   whose accuracies are the means over the held-out domains of that seed.
   t needs room for DG_METHODS * seeds more records. */
static void append_domain_averages(run_table *t, int seeds)
{
    const int runs = t->count;
    long seed;
    int k, i;
    for (k = 0; k < DG_METHODS; k++)
        for (seed = 0; seed < seeds; seed++) {
            run_record average;
            int n = 0;
            memset(&average, 0, sizeof average);
            for (i = 0; i < runs; i++) {
                const run_record *r = &t->runs[i];
                if (strcmp(r->method, method_names[dg_methods[k]]) != 0 || r->seed != seed)
                    continue;
                if (n == 0) {
                    average = *r;
                } else {
                    average.val_acc += r->val_acc;
                    average.test_acc += r->test_acc;
                }
                n++;
            }
            if (n == 0)
                continue;
            average.domain = DOMAIN_AVERAGE;
            average.val_acc /= n;
            average.test_acc /= n;
            t->runs[t->count++] = average;
        }
}

/* Writes dg-accuracy.svg: test accuracy per held-out domain and on
   average, one bar per method, error bars of one sample standard deviation. */
static int write_dg_figure(const sweep *s, const summary_cell *cells, int count)
{
    const double bar_width = 0.8 / DG_METHODS;
    char path[1100], title[160], legend[64];
    double x[DG_GROUPS];
    FILE *f = open_output(s->o.out_dir, "dg-accuracy.svg", path, sizeof path);
    svg_figure g;
    int group, k;

    if (!f)
        return 0;
    for (group = 0; group < DG_GROUPS; group++)
        x[group] = group;
    snprintf(title, sizeof title, "Rotated MNIST, held-out domain test accuracy (mean &#177; sample std, %d seed%s)",
             s->o.seeds, plural(s->o.seeds));
    figure_begin(&g, f, title, -0.5, DG_GROUPS - 0.5, 0, 100);
    figure_axes(&g, DG_GROUPS, x, dg_group_labels, 10, "held-out domain (rotation)", "test accuracy (%)");
    for (k = 0; k < DG_METHODS; k++) {
        const method_kind method = dg_methods[k];
        const double p = uses_stochca(method) ? s->o.p : 0;
        for (group = 0; group < DG_GROUPS; group++) {
            const int domain = group < DOMAIN_COUNT ? domain_angles[group] : DOMAIN_AVERAGE;
            const summary_cell *c = find_cell(cells, count, method_names[method], p, 0, domain);
            if (c)
                figure_bar(&g, group + (k - (DG_METHODS - 1) / 2.0) * bar_width, bar_width, c->test_mean,
                           c->test_std, series_colors[k]);
        }
        if (p > 0)
            snprintf(legend, sizeof legend, "%s (p = %g)", method_names[method], p);
        else
            snprintf(legend, sizeof legend, "%s (ERM)", method_names[method]);
        figure_legend(&g, series_colors[k], legend, 0);
    }
    figure_end(&g);
    return close_output(f, path);
}

static void print_dg_table(const sweep *s, const summary_cell *cells, int count)
{
    char name[64];
    int group, k;
    printf("\nRotated MNIST, test accuracy in %% on the held-out domain, mean (sample std) over %d seed%s\n%-16s",
           s->o.seeds, plural(s->o.seeds), "method");
    for (group = 0; group < DOMAIN_COUNT; group++) {
        snprintf(name, sizeof name, "%d deg", domain_angles[group]);
        printf("  %14s", name);
    }
    printf("  %14s\n", "avg");
    for (k = 0; k < DG_METHODS; k++) {
        const method_kind method = dg_methods[k];
        const double p = uses_stochca(method) ? s->o.p : 0;
        if (p > 0)
            snprintf(name, sizeof name, "%s p=%g", method_names[method], p);
        else
            snprintf(name, sizeof name, "%s", method_names[method]);
        printf("%-16s", name);
        for (group = 0; group < DG_GROUPS; group++) {
            const int domain = group < DOMAIN_COUNT ? domain_angles[group] : DOMAIN_AVERAGE;
            const summary_cell *c = find_cell(cells, count, method_names[method], p, 0, domain);
            print_mean_std(c ? c->test_mean : NAN, c ? c->test_std : NAN);
        }
        printf("\n");
    }
}

/* The domain-generalization sweep: every method, held-out domain and seed. */
static int cmd_dg_sweep(const options *o)
{
    sweep s;
    run_table runs;
    summary_cell *cells = NULL;
    int count = -1, ok;

    memset(&runs, 0, sizeof runs);
    ok = open_dg_sweep(&s, o) && init_table(&runs, (DOMAIN_COUNT + 1) * DG_METHODS * o->seeds);
    s.total = DOMAIN_COUNT * DG_METHODS * o->seeds;
    ok = ok && run_dg_grid(&s, &runs);
    if (ok) {
        append_domain_averages(&runs, o->seeds);
        count = summarize_table(&runs, &cells);
        ok = count >= 0 && write_summary(o->out_dir, "dg-summary.tsv", cells, count, 1) &&
             write_dg_figure(&s, cells, count);
    }
    if (ok) {
        print_dg_table(&s, cells, count);
        printf("\nwrote dg-runs.tsv, dg-summary.tsv and dg-accuracy.svg to %s\n", o->out_dir);
    }
    free(cells);
    free_table(&runs);
    return close_sweep(&s) && ok;
}

#ifndef STOCHCA_TRAIN_NO_MAIN
int main(int argc, char **argv)
{
    /* Flags without a command (./train --threads 1) configure the main job. */
    const int main_job = argc == 1 || (argv[1][0] == '-' && argv[1][1] == '-' && strcmp(argv[1], "--help"));
    const char *command = main_job ? "" : argv[1];
    const int first_flag = main_job ? 1 : 2;
    const int pretraining = !strcmp(command, "pretrain"), benchmark = !strcmp(command, "bench");
    const int tl_sweep = !strcmp(command, "tl-sweep"), dg_sweep = !strcmp(command, "dg-sweep");
    options o = default_options(pretraining || benchmark);
    int ok;

    if (!strcmp(command, "--help") || !strcmp(command, "-h")) {
        print_usage(stdout);
        return 0;
    }
    if (benchmark) {
        /* The reference configuration of the benchmark: 50 tokens, p = 0.5. */
        o.config.patch_size = 4;
        o.p = 0.5;
    }
    if (!main_job && !pretraining && !benchmark && strcmp(command, "finetune") && !tl_sweep && !dg_sweep) {
        fprintf(stderr, "train: unknown command '%s'\n\n", command);
        print_usage(stderr);
        return 2;
    }
    if (tl_sweep || dg_sweep)
        o.steps = SWEEP_DEFAULT_STEPS;
    if (!parse_options(&o, command, argc - first_flag, argv + first_flag))
        return 2;
    set_threads(&o);
    if (tl_sweep)
        ok = cmd_tl_sweep(&o);
    else if (dg_sweep)
        ok = cmd_dg_sweep(&o);
    else if (pretraining)
        ok = cmd_pretrain(&o);
    else if (benchmark)
        ok = cmd_bench(&o);
    else if (main_job)
        ok = cmd_main_job(o);
    else
        ok = cmd_finetune(&o);
    return ok ? 0 : 1;
}
#endif
