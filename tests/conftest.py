"""Tiny HuggingFace configs of every supported family, with realistic inputs
(attention masks with padding, labels so the loss is inside the graph)."""
import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Under `pytest -n N` the cores are shared among N workers (and the processes they spawn):
    # oversubscribed OpenMP threads make a tiny-config step several times slower.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU its kernels run on CPU tensors through
    # its interpreter, so tests/test_kernels.py can check them against the reference implementation.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch import nn

BATCH, SEQ = 4, 16


def load_tool(name: str):
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:  # what running a tool as a script gives it: its siblings (common, tasks)
        sys.path.append(str(tools))
    path = tools / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_inputs(vocab, labels="class"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -5:] = 0  # padding, so the attention mask is real data in eager and graph alike
    mask[2, -2:] = 0
    lab = torch.tensor([0, 1, 1, 0]) if labels == "class" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def make_bert(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, **kw)
    return BertForSequenceClassification(cfg), _text_inputs(100)


def make_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=1)
    return RobertaForSequenceClassification(cfg), _text_inputs(100)


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), _text_inputs(100, labels="lm")


def make_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    g = torch.Generator().manual_seed(0)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g),
                                            "labels": torch.tensor([0, 2, 1, 1])}


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg), _text_inputs(100, labels="lm")


class TinyTransformer(nn.Module):
    """A user-written pre-norm transformer classifier: no HuggingFace anywhere."""

    def __init__(self, vocab=50, dim=32, heads=2, layers=2, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                "ln2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim),
            }))
        self.head = nn.Linear(dim, classes)
        self.drop = nn.Dropout(0.1)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        b, n, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = self.drop(torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1))
            x = x + self.drop(blk["proj"]((att @ v).transpose(1, 2).reshape(b, n, d)))
            x = x + self.drop(blk["fc2"](torch.nn.functional.gelu(blk["fc1"](blk["ln2"](x)))))
        logits = self.head(x.mean(dim=1))
        return torch.nn.functional.cross_entropy(logits, labels)


def make_custom():
    g = torch.Generator().manual_seed(0)
    return TinyTransformer(), (torch.randint(0, 50, (BATCH, SEQ), generator=g), torch.tensor([0, 1, 2, 0]))


FAMILIES = {
    "bert": make_bert,
    "roberta": make_roberta,
    "gpt2": make_gpt2,
    "vit": make_vit,
    "llama": make_llama,
    "custom": make_custom,
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, inputs = FAMILIES[request.param]()
    return request.param, model.train(), inputs


def call(model, inputs):
    """Run a model on dict (keyword) or tuple (positional) inputs; return the loss."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.loss
