"""Make `peft_adapter/` and `peft_reference.json`: a small LoRA adapter for
all-MiniLM-L6-v2 saved by Hugging Face PEFT, and the sentence embeddings that
transformers' `BertModel` computes with it.

`tests/test_peft_bert.py` loads the adapter with `quaxlora.load_peft` into the
Equinox BERT of `minilm.py` (naming modules with `minilm.peft_name`) and checks the
embeddings against this fixture, so the test suite needs neither torch nor PEFT.
The adapter targets the attention's query and value projections, the intermediate
dense layers (rank 2) and the word embeddings (rank 1), with `bias="all"`: every
bias of the model is trained and saved, the adapted modules' as
`<module>.base_layer.bias`. Its values are random, small enough to keep the
embeddings meaningful and large enough to move them.

This script also checks the other direction: it loads the adapter with quaxlora,
writes it back with `quaxlora.save_peft`, loads that into PEFT, and records how far
PEFT's embeddings with it are from the originals. To regenerate (the only script
here that needs torch, PEFT and, for that check, quaxlora):

```
pip install torch transformers peft  # the CPU build of torch is enough
python examples/bert/make_peft_adapter.py
```
"""

import json
import pathlib
import shutil
import tempfile

import peft
import torch
import transformers
from make_reference import SENTENCES
from minilm import _read_files


HERE = pathlib.Path(__file__).parent
ADAPTER = HERE / "peft_adapter"
OUT = HERE / "peft_reference.json"
CONFIG = dict(
    r=2,
    lora_alpha=4,
    target_modules=["query", "value", "intermediate.dense", "word_embeddings"],
    rank_pattern={"word_embeddings": 1},
    alpha_pattern={"value": 3},
    bias="all",
)


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    # sentence-transformers' Pooling(mean) + Normalize.
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _quaxlora_round_trip(directory: pathlib.Path) -> dict[str, list[str]]:
    """Load `ADAPTER` with quaxlora and save it again into `directory`."""
    from minilm import load_pretrained, peft_name
    from safetensors.numpy import load_file

    import quaxlora as ql

    model, _ = load_pretrained()
    ql.save_peft(directory, ql.load_peft(ADAPTER, model, peft_name), peft_name)
    return {
        d.name: sorted(load_file(d / "adapter_model.safetensors"))
        for d in (ADAPTER, directory)
    }


def main():
    files = _read_files(None)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (pathlib.Path(tmp) / name).write_bytes(data)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)

        def fresh():
            model = transformers.BertModel.from_pretrained(tmp, add_pooling_layer=False)
            return model.eval()

        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        base = _embed(fresh(), batch)
        torch.manual_seed(0)
        model = peft.get_peft_model(fresh(), peft.LoraConfig(**CONFIG)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn_like(p))
                elif p.requires_grad:  # a bias
                    p.add_(0.05 * torch.randn_like(p))
        shutil.rmtree(ADAPTER, ignore_errors=True)
        model.save_pretrained(ADAPTER)
        (ADAPTER / "README.md").unlink()  # a model-card stub
        embeddings = _embed(model, batch)
        with tempfile.TemporaryDirectory() as ours:
            keys = _quaxlora_round_trip(pathlib.Path(ours))
            loaded = peft.PeftModel.from_pretrained(fresh(), ours).eval()
            again = _embed(loaded, batch)
    fixture = {
        "made_by": f"peft {peft.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}",
        "sentences": SENTENCES,
        "embeddings": embeddings.tolist(),
        "max_abs_change_from_base": float((embeddings - base).abs().max()),
        "quaxlora_saved_keys_equal_peft": keys[ADAPTER.name]
        == next(v for k, v in keys.items() if k != ADAPTER.name),
        "max_abs_diff_peft_with_quaxlora_saved": float(
            (again - embeddings).abs().max()
        ),
    }
    # One line per list, so that the fixture diffs readably.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items()]
    OUT.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print({k: v for k, v in fixture.items() if k not in ("sentences", "embeddings")})


if __name__ == "__main__":
    main()
