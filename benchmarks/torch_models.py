"""The benchmark models in PyTorch, for Hugging Face PEFT (optional: torch + peft).

The MLP and the GPT are the same architectures as `benchmarks/models.py`; MiniLM is
transformers' own `BertModel` with the same pretrained weights.
"""

import copy
import math
import pathlib
import tempfile

import numpy as np

from benchmarks.timing import interleaved


def _models(torch):
    nn = torch.nn

    class MLP(nn.Module):
        def __init__(self, width, depth):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

        def forward(self, x):
            for layer in self.layers[:-1]:
                x = torch.relu(layer(x))
            return self.layers[-1](x)

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, s, d = x.shape
            dh = d // self.heads
            h = self.ln1(x)
            q, k, v = (
                f(h).view(b, s, self.heads, dh).transpose(1, 2)
                for f in (self.q, self.k, self.v)
            )
            logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
            mask = torch.ones(s, s, dtype=torch.bool).tril()
            attn = logits.masked_fill(~mask, -1e9).softmax(-1)
            z = (attn @ v).transpose(1, 2).reshape(b, s, d)
            x = x + self.o(z)
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab, d, heads, depth):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x))

    return MLP, GPT


def _step(model, forward, loss_fn, torch):
    """One Adam step on the parameters of `model` that require a gradient."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(model)).backward()
        opt.step()

    return step


def _floor(model, torch):
    """The frozen floor: every weight frozen but the first linear layer's bias, so
    the backward runs through every layer after it but computes no weight gradient."""
    floor = copy.deepcopy(model).requires_grad_(False)
    first = next(m for m in floor.modules() if isinstance(m, torch.nn.Linear))
    first.bias.requires_grad_(True)
    return floor


def _bench(model, targets, rank, forward, loss_fn, reps, peft, torch):
    """Full fine-tuning, PEFT LoRA and the frozen floor's steps, interleaved; then
    the base model's and the unmerged LoRA model's inference, interleaved."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets
    )
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    trained = [model, lora, _floor(model, torch)]
    (full, lora_step, floor), (_, lora_ratio, floor_ratio) = interleaved(
        [_step(m, forward, loss_fn, torch) for m in trained], reps
    )

    def infer(m):
        def f():
            with torch.no_grad():
                forward(m)

        return f

    (base, unmerged), (_, infer_ratio) = interleaved([infer(model), infer(lora)], reps)
    return dict(
        full_step=full,
        lora_step=lora_step,
        floor_step=floor,
        lora_ratio=lora_ratio,
        floor_ratio=floor_ratio,
        base_infer=base,
        lora_infer=unmerged,
        infer_ratio=infer_ratio,
    )


def bert(layers, torch):
    """Hugging Face transformers' `BertModel` with all-MiniLM-L6-v2's weights, from
    the same installed package as `examples/bert/minilm.py` (its first `layers`
    layers, all if None), in eval mode: no dropout, as the Equinox BERT."""
    import transformers

    from benchmarks.models import bert_example

    bert_example()  # puts `examples/bert/` on the path
    import minilm

    extra = {} if layers is None else dict(num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in minilm._read_files(None).items():
            (pathlib.Path(tmp) / name).write_bytes(data)
        model = transformers.BertModel.from_pretrained(
            tmp, add_pooling_layer=False, **extra
        )
    return model.eval()


def contrastive_loss(hidden, mask, scale, torch):
    """`examples/bert/finetune.py`'s loss: mean pooling, unit norm, symmetric InfoNCE
    over in-batch negatives, rows `i` and `n + i` a pair."""
    F = torch.nn.functional
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    e = F.normalize(pooled, dim=1)
    n = e.shape[0] // 2
    logits = scale * e[:n] @ e[n:].T
    labels = torch.arange(n)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def run(cfg, tasks, peft, torch):
    """PyTorch's full fine-tuning, PEFT LoRA and frozen floor on each task: the MLP
    and the GPT with their own random weights and data, of the same shapes;
    all-MiniLM-L6-v2 with the same pretrained weights and the same batch."""
    torch.manual_seed(0)
    MLP, GPT = _models(torch)
    out = {}
    task = {t.name: t for t in tasks}

    mlp = MLP(cfg.mlp_width, cfg.mlp_depth)
    x = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    y = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    out["mlp"] = _bench(
        mlp, [f"layers.{i}" for i in range(cfg.mlp_depth)], task["mlp"].rank,
        lambda m: m(x), lambda p: ((p - y) ** 2).mean(), cfg.reps, peft, torch,
    )  # fmt: skip
    print("mlp", out["mlp"], flush=True)

    gpt = GPT(cfg.vocab, cfg.d_model, cfg.heads, cfg.blocks)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def ce(logits):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, cfg.vocab), y.reshape(-1)
        )

    out["gpt"] = _bench(
        gpt, ["q", "k", "v", "o", "fc1", "fc2"], task["gpt"].rank, lambda m: m(x),
        ce, cfg.reps, peft, torch,
    )  # fmt: skip
    print("gpt", out["gpt"], flush=True)

    ids, mask = (torch.from_numpy(np.asarray(a)) for a in task["minilm"].batch)
    ids, mask = ids.long(), mask.long()
    out["minilm"] = _bench(
        bert(cfg.minilm_layers, torch),
        # PEFT's names of the same targets: query, key, value and the three `dense`
        ["query", "key", "value", "dense"], task["minilm"].rank,
        lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state,
        lambda h: contrastive_loss(h, mask, 20.0, torch), cfg.reps, peft, torch,
    )  # fmt: skip
    print("minilm", out["minilm"], flush=True)
    return out
