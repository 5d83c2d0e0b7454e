"""The same two models in PyTorch, for Hugging Face PEFT (optional: torch + peft)."""

import copy
import math
import statistics
import time


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


def _interleaved(fns, reps):
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) for t in times]
    ratios = [statistics.median([a / b for a, b in zip(t, times[0])]) for t in times]
    return med, ratios


def _bench(model, lora_model, x, loss_fn, reps, torch):
    full_opt = torch.optim.Adam(model.parameters(), 1e-4)
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    lora_opt = torch.optim.Adam(lora_params, 1e-4)

    def step(m, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x)).backward()
            opt.step()

        return f

    def infer(m):
        def f():
            with torch.no_grad():
                m(x)

        return f

    (full, lora), (_, step_ratio) = _interleaved(
        [step(model, full_opt), step(lora_model, lora_opt)], reps
    )
    (base, unmerged), (_, infer_ratio) = _interleaved(
        [infer(model), infer(lora_model)], reps
    )
    return dict(
        full_step=full,
        lora_step=lora,
        step_ratio=step_ratio,
        base_infer=base,
        lora_infer=unmerged,
        infer_ratio=infer_ratio,
    )


def run(cfg, rank, peft, torch):
    torch.manual_seed(0)
    MLP, GPT = _models(torch)
    out = {}
    lcfg = dict(r=rank, lora_alpha=rank, lora_dropout=0.0)

    mlp = MLP(cfg.mlp_width, cfg.mlp_depth)
    names = [f"layers.{i}" for i in range(cfg.mlp_depth)]
    lora = peft.get_peft_model(
        copy.deepcopy(mlp), peft.LoraConfig(target_modules=names, **lcfg)
    )
    x = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    y = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    out["mlp"] = _bench(mlp, lora, x, lambda p: ((p - y) ** 2).mean(), cfg.reps, torch)
    print("mlp", out["mlp"], flush=True)

    gpt = GPT(cfg.vocab, cfg.d_model, cfg.heads, cfg.blocks)
    targets = ["q", "k", "v", "o", "fc1", "fc2"]
    lora = peft.get_peft_model(
        copy.deepcopy(gpt), peft.LoraConfig(target_modules=targets, **lcfg)
    )
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def ce(logits):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, cfg.vocab), y.reshape(-1)
        )

    out["gpt"] = _bench(gpt, lora, x, ce, cfg.reps, torch)
    print("gpt", out["gpt"], flush=True)
    return out
