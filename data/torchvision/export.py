#!/usr/bin/python3
"""Reference data for stochca: a small torchvision ViT, its weights in the
STCA checkpoint format, a fixed input batch, and float64 reference outputs.

Files written to --out (default: the folder of this script):
  model.stca          checkpoint (header of 16 LE uint32 words + P float32 LE)
  input.f32           N*C*S*S float32 LE, C order (N, C, H, W)
  labels.i32          N int32 LE
  logits.txt          N*K float64 numbers (row-major N x K), one per line
  loss.txt            mean cross-entropy over the batch, one float64 number
  grads.txt           P float64 numbers, one per line: d(mean loss)/d(param),
                      same order and layout as the checkpoint parameters
  pre.stca            a second checkpoint (other seed), used as the frozen
                      "pretrained" model for the StochCA reference below
  stochca_logits_<flags>.txt   logits (N*K lines) of model.stca when block l
                      uses cross-attention to pre.stca's K0, V0 if flags[l]=1
  stochca_loss_<flags>.txt     mean cross-entropy for the same forward
  state_dict_keys.txt key, shape, element count, float offset in the
                      parameter array (written next to this script as well)

The reference forward runs in float64 on the float32 weights and inputs
(converted exactly), in eval mode.  The checkpoint is read back from disk and
run through an independent numpy implementation as a check of the layout.
"""
import argparse
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

MAGIC = 0x41435453  # bytes "STCA" in little-endian order
VERSION = 1


def build_model(args, seed):
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=args.image_size, patch_size=args.patch_size,
                          num_layers=args.depth, num_heads=args.heads,
                          hidden_dim=args.dim, mlp_dim=args.mlp,
                          num_classes=args.classes)
    if args.channels != 3:
        m.conv_proj = torch.nn.Conv2d(args.channels, args.dim, args.patch_size,
                                      args.patch_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            # state_dict() tensors share storage with the parameters
            if name.endswith("weight") and t.dim() == 1:
                # LayerNorm gain: stay near 1
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif name in ("class_token", "encoder.pos_embedding"):
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    m.eval()
    return m


def header(args, nparams):
    words = [MAGIC, VERSION, args.image_size, args.channels, args.patch_size, args.dim,
             args.depth, args.heads, args.mlp, args.classes, nparams, 0, 0, 0, 0, 0]
    return struct.pack("<16I", *words)


def write_checkpoint(path, args, model):
    sd = model.state_dict()
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32)
                      for t in sd.values()])
    with open(path, "wb") as f:
        f.write(header(args, flat.numel()))
        f.write(flat.numpy().astype("<f4").tobytes())
    return flat.numel()


def write_lines(path, values):
    with open(path, "w") as f:
        for v in values:
            f.write("%.17g\n" % float(v))


# ---------------------------------------------------------------------------
# Explicit forward (torch), used for the StochCA reference. It follows the
# math of torchvision 0.14 EncoderBlock and torch 1.13 nn.MultiheadAttention.

def attention(q, k, v, heads):
    n, s, d = q.shape
    hd = d // heads
    q = q.reshape(n, s, heads, hd).transpose(1, 2)
    k = k.reshape(n, k.shape[1], heads, hd).transpose(1, 2)
    v = v.reshape(n, v.shape[1], heads, hd).transpose(1, 2)
    w = torch.softmax((q / math.sqrt(hd)) @ k.transpose(-2, -1), dim=-1)
    return (w @ v).transpose(1, 2).reshape(n, s, d)


def embed(m, x):
    n = x.shape[0]
    t = m.conv_proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.class_token.expand(n, -1, -1), t], dim=1)
    return t + m.encoder.pos_embedding


def block_forward(blk, x, heads, kv=None):
    """Run one encoder block and return (output, (k, v)) with its own k, v.

    When kv is given, the queries attend to those k, v instead.
    """
    d = x.shape[-1]
    att = blk.self_attention
    h = blk.ln_1(x)
    qkv = F.linear(h, att.in_proj_weight, att.in_proj_bias)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    if kv is not None:
        k, v = kv
    o = att.out_proj(attention(q, k, v, heads))
    x = x + o
    return x + blk.mlp(blk.ln_2(x)), (qkv[..., d:2 * d], qkv[..., 2 * d:])


def explicit_forward(m, x, heads, kvs=None, flags=None):
    t = embed(m, x)
    captured = []
    for i, blk in enumerate(m.encoder.layers):
        kv = kvs[i] if (flags is not None and flags[i]) else None
        t, own = block_forward(blk, t, heads, kv)
        captured.append(own)
    t = m.encoder.ln(t)
    return m.heads(t[:, 0]), captured


# ---------------------------------------------------------------------------
# Independent numpy forward from the checkpoint file on disk.

def np_layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_forward_from_file(path, x):
    raw = open(path, "rb").read()
    w = struct.unpack("<16I", raw[:64])
    assert w[0] == MAGIC, hex(w[0])
    assert w[1] == VERSION, w[1]
    S, C, p, D, L, H, M, K, P = w[2:11]
    prm = np.frombuffer(raw[64:], dtype="<f4").astype(np.float64)
    assert prm.size == P
    pos = [0]

    def take(*shape):
        n = int(np.prod(shape))
        out = prm[pos[0]:pos[0] + n].reshape(shape)
        pos[0] += n
        return out

    g = S // p
    T = g * g + 1
    cls = take(1, 1, D)
    cw = take(D, C, p, p)
    cb = take(D)
    pe = take(1, T, D)
    N = x.shape[0]
    # patches in row-major grid order, each flattened as (c, ky, kx)
    patches = x.reshape(N, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(N, g * g, C * p * p)
    tok = patches @ cw.reshape(D, -1).T + cb
    t = np.concatenate([np.broadcast_to(cls, (N, 1, D)), tok], axis=1) + pe
    hd = D // H
    for _ in range(L):
        l1w, l1b = take(D), take(D)
        inw, inb = take(3 * D, D), take(3 * D)
        ow, ob = take(D, D), take(D)
        l2w, l2b = take(D), take(D)
        f1w, f1b = take(M, D), take(M)
        f2w, f2b = take(D, M), take(D)
        h = np_layernorm(t, l1w, l1b)
        qkv = h @ inw.T + inb
        q = qkv[..., :D].reshape(N, T, H, hd).transpose(0, 2, 1, 3)
        k = qkv[..., D:2 * D].reshape(N, T, H, hd).transpose(0, 2, 1, 3)
        v = qkv[..., 2 * D:].reshape(N, T, H, hd).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        heads_out = (s @ v).transpose(0, 2, 1, 3).reshape(N, T, D)
        t = t + heads_out @ ow.T + ob
        h = np_layernorm(t, l2w, l2b)
        t = t + np_gelu(h @ f1w.T + f1b) @ f2w.T + f2b
    lnw, lnb = take(D), take(D)
    hw, hb = take(K, D), take(K)
    assert pos[0] == P
    t = np_layernorm(t, lnw, lnb)
    return t[:, 0] @ hw.T + hb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model = build_model(args, args.seed)
    sd = model.state_dict()
    for name, t in sd.items():
        assert torch.count_nonzero(t).item() == t.numel(), name

    # key listing with offsets into the parameter array
    lines, off = [], 0
    for name, t in sd.items():
        lines.append("%s %s %d %d" % (name, tuple(t.shape), t.numel(), off))
        off += t.numel()
    lines.append("total %d" % off)
    eps = sorted({mod.eps for mod in model.modules()
                  if isinstance(mod, torch.nn.LayerNorm)})
    lines.append("layernorm_eps %r" % eps)
    for p in (os.path.join(args.out, "state_dict_keys.txt"),
              os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "state_dict_keys.txt")):
        with open(p, "w") as f:
            f.write("# key shape numel offset\n" + "\n".join(lines) + "\n")

    ckpt = os.path.join(args.out, "model.stca")
    P = write_checkpoint(ckpt, args, model)

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size,
                    generator=g, dtype=torch.float32)
    y = torch.randint(0, args.classes, (args.batch,), generator=g,
                      dtype=torch.int64)
    x.numpy().astype("<f4").tofile(os.path.join(args.out, "input.f32"))
    y.numpy().astype("<i4").tofile(os.path.join(args.out, "labels.i32"))

    # float64 reference: the float32 values convert exactly
    md = model.double()
    xd = x.double()
    logits = md(xd)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in md.parameters()])
    # parameters() and state_dict() list the same tensors in the same order
    assert [n for n, _ in md.named_parameters()] == list(sd.keys())
    assert grads.numel() == P
    write_lines(os.path.join(args.out, "logits.txt"), logits.detach().reshape(-1))
    write_lines(os.path.join(args.out, "loss.txt"), [loss.item()])
    write_lines(os.path.join(args.out, "grads.txt"), grads)

    # checks: explicit torch forward and numpy forward from the file
    with torch.no_grad():
        explicit_logits, _ = explicit_forward(md, xd, args.heads)
    numpy_logits = np_forward_from_file(ckpt, x.numpy().astype(np.float64))
    explicit_err = (explicit_logits - logits).abs().max().item()
    numpy_err = np.abs(numpy_logits - logits.detach().numpy()).max()
    print("max |explicit - torchvision| = %.3g" % explicit_err)
    print("max |numpy(from file) - torchvision| = %.3g" % numpy_err)
    assert explicit_err < 1e-12, explicit_err
    assert numpy_err < 1e-12, numpy_err

    # StochCA reference: frozen model from another seed supplies K0, V0
    pre = build_model(args, args.seed + 1)
    write_checkpoint(os.path.join(args.out, "pre.stca"), args, pre)
    pre = pre.double()
    with torch.no_grad():
        _, kvs = explicit_forward(pre, xd, args.heads)
        for flags in ([1] * args.depth, [1] + [0] * (args.depth - 1),
                      [0] * args.depth):
            tag = "".join(str(f) for f in flags)
            lg, _ = explicit_forward(md, xd, args.heads, kvs, flags)
            write_lines(os.path.join(args.out, "stochca_logits_%s.txt" % tag),
                        lg.reshape(-1))
            write_lines(os.path.join(args.out, "stochca_loss_%s.txt" % tag),
                        [F.cross_entropy(lg, y).item()])
            if not any(flags):
                assert (lg - logits).abs().max().item() < 1e-12

    print("P = %d parameters" % P)
    print("logits:", logits.detach().numpy())
    print("loss: %.17g" % loss.item())
    print("wrote", sorted(os.listdir(args.out)), "to", args.out)


if __name__ == "__main__":
    sys.exit(main())
