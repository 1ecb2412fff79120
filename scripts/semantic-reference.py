#!/usr/bin/env python3
"""Reference embeddings for all-MiniLM-L6-v2, computed independently of the Rust code:
a BERT forward pass written with numpy straight from model.safetensors (parsed by hand),
the Hugging Face `tokenizers` package for WordPiece, mean pooling over the attention mask
and L2 normalisation as the model card specifies.

Writes fixtures/semantic/reference.json; origin's embed test checks the Rust embedder
against it. Run: .local/ref-venv/bin/python scripts/semantic-reference.py
(the venv needs numpy and tokenizers from PyPI)."""
import json, math, struct, sys
import numpy as np
from tokenizers import Tokenizer

MODEL = ".local/models/all-minilm-l6-v2"
TEXTS = [
    "How do I reverse a list in Python?",
    "What is the capital of France?",
    "Is it safe to eat raw chicken?",
    "Explain the difference between TCP and UDP in simple terms, with an example of when each is the better choice.",
    "",
    # The sentence-transformers quickstart's example for this model, whose documented
    # similarities are 0.6660 (0-1), 0.1046 (0-2), 0.1411 (1-2): a check of this script.
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
]

def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out

def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b

def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))

def embed(w, tok, text, heads=12, layers=6):
    tok.no_padding()
    tok.enable_truncation(256)
    enc = tok.encode(text)
    ids = np.array(enc.ids)
    mask = np.array(enc.attention_mask, dtype=np.float64)
    g = lambda k: w[k].astype(np.float64)
    x = g("embeddings.word_embeddings.weight")[ids] \
        + g("embeddings.position_embeddings.weight")[: len(ids)] \
        + g("embeddings.token_type_embeddings.weight")[np.array(enc.type_ids)]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
    n, d = x.shape
    hd = d // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."
        lin = lambda h, k: h @ g(p + k + ".weight").T + g(p + k + ".bias")
        q = lin(x, "attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + (1.0 - mask)[None, None, :] * -1e9
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = layer_norm(lin(a, "attention.output.dense") + x,
                       g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"))
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(lin(h, "output.dense") + x,
                       g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"))
    pooled = (x * mask[:, None]).sum(0) / max(mask.sum(), 1e-9)
    return pooled / max(np.linalg.norm(pooled), 1e-12)

def main():
    w = load_safetensors(f"{MODEL}/model.safetensors")
    w = {k[5:] if k.startswith("bert.") else k: v for k, v in w.items()}
    tok = Tokenizer.from_file(f"{MODEL}/tokenizer.json")
    vectors = [embed(w, tok, t) for t in TEXTS]
    out = {
        "made_by": "scripts/semantic-reference.py: numpy BERT forward pass from model.safetensors, "
                   "HF tokenizers WordPiece, mean pooling over the attention mask, L2 normalisation",
        "model_sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "texts": [{"text": t, "embedding": [round(float(x), 7) for x in v]} for t, v in zip(TEXTS, vectors)],
        "cosines": [[round(float(a @ b), 6) for b in vectors] for a in vectors],
    }
    json.dump(out, open("fixtures/semantic/reference.json", "w"), indent=1)
    print("cosine matrix:", out["cosines"])

main()
