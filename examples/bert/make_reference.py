"""Make `reference.json`: all-MiniLM-L6-v2 sentence embeddings computed by the
reference implementation, Hugging Face transformers' `BertModel` on the CPU torch.

`tests/test_bert.py` checks the Equinox BERT of `model.py` against this fixture, so
the test suite needs neither torch nor transformers. To regenerate it (this is the
only script here that needs them):

```
pip install torch transformers  # the CPU build of torch is enough
python examples/bert/make_reference.py
```
"""

import json
import pathlib
import tempfile

import torch
import transformers
from minilm import _read_files


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A `for` loop iterates over the items of any sequence, in order.",
    "Exceptions can be raised with the raise statement.",
    "LoRA adds a trainable low-rank update to a frozen weight matrix.",
    "Short.",
    "Unicode: naïve café — déjà vu, 東京.",
]
OUT = pathlib.Path(__file__).with_name("reference.json")


def main():
    files = _read_files(None)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (pathlib.Path(tmp) / name).write_bytes(data)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
        model = transformers.BertModel.from_pretrained(tmp, add_pooling_layer=False)
    model.eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    # sentence-transformers' Pooling(mean) + Normalize.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    ids = [
        row[m.bool()].tolist()
        for row, m in zip(batch["input_ids"], batch["attention_mask"])
    ]
    fixture = {
        "made_by": f"transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": embeddings.tolist(),
    }
    # One line per list, so that the fixture diffs readably.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items()]
    OUT.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {OUT} ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
