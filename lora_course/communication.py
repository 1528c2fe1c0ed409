"""How many bytes data-parallel training moves per step: counted on a real run, projected to big models.

Data parallelism (several processes, each with a full copy of the model or a shard of it, each on
its own slice of the batch) has to agree on one gradient per step. What it sends depends on the
wrapper:

- **DDP** (``DistributedDataParallel``) keeps a full replica per process and *all-reduces* the
  gradient of every **trainable** parameter once per step (packed into buckets). A frozen weight
  has no gradient and is left out when DDP is built, so LoRA sends 4 bytes × (A, B and head) in
  float32 instead of 4 bytes × every weight.
- **FSDP** (``fully_shard``, ZeRO stage 3, Rajbhandari et al. 2020, arXiv:1910.02054) keeps only a
  1/N shard of every parameter per process. Before a layer runs it *all-gathers* the full weight
  (in forward, and again in backward, since it was freed after forward to save memory), and
  after backward it *reduce-scatters* the gradients, so each process keeps the summed gradient
  of its own shard. LoRA shrinks the reduce-scatter (only trainable parameters have gradients)
  and the optimizer state, but every frozen weight is still gathered twice per step: backward
  needs W to pass the gradient on to earlier layers (dx = dy · W).

Two ways to count, used against each other in the tests:

- ``AllReduceCounter`` is a DDP *communication hook*: DDP calls it with each bucket of gradients
  instead of its built-in all-reduce; it records the bucket's size and then averages the bucket
  exactly as the default hook does (divide by N, all-reduce).
- ``CollectiveCounter`` is a ``TorchDispatchMode``: every collective of ``torch.distributed``
  (``c10d`` ops) passes through PyTorch's dispatcher, where the mode sees its tensors.
  ``torch.distributed.tensor.debug.CommDebugMode`` uses the same mechanism but counts calls,
  not bytes.

Payload convention: the bytes of the full (unsharded) tensor a collective works on: the
buffer of an all-reduce, the gathered output of an all-gather, the unreduced input of a
reduce-scatter. What crosses the wire per process follows from it: in a ring of N processes an
all-gather or a reduce-scatter sends (N - 1)/N of the payload, an all-reduce (a reduce-scatter
followed by an all-gather) 2(N - 1)/N.
"""
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from . import architectures
from .errors import check_int, check_number


# --------------------------------------------------------------------------------------------
# Counting on a running process group
# --------------------------------------------------------------------------------------------
class AllReduceCounter:
    """State of ``counting_allreduce_hook``: bytes and buckets all-reduced since the last ``reset``.

    Usage (after building ``ddp = DistributedDataParallel(model)``)::

        counter = AllReduceCounter()
        ddp.register_comm_hook(counter, counting_allreduce_hook)
        ...one training step...
        counter.bytes, counter.buckets; counter.reset()
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        self.process_group = process_group  # None: the default (world) group
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.buckets = 0


def counting_allreduce_hook(counter: AllReduceCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: count the bucket, then average it as DDP's default does.

    ``bucket.buffer()`` is one flat tensor holding the gradients of the bucket's parameters
    (numel = their total size). The default behaviour is ``allreduce_hook``: divide by the world
    size N, all-reduce (sum), so every replica ends with the mean gradient (g_0 + ... + g_{N-1}) / N.
    (DDP checks the annotations: this module must not use ``from __future__ import annotations``.)"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    counter.bytes += buffer.numel() * buffer.element_size()
    counter.buckets += 1
    return allreduce_hook(counter.process_group, bucket)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an argument that is a tensor, a list of tensors or a list of lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


# c10d op name -> (kind, index of the argument that holds the payload). See the module
# docstring: the full tensor of each collective (outputs of gathers, inputs of scatters).
_PAYLOAD = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0), "allgather_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0),
}


class CollectiveCounter(TorchDispatchMode):
    """``with CollectiveCounter() as counter:`` counts the payload bytes of every ``c10d``
    collective issued inside the block, by kind ("all_reduce", "all_gather", "reduce_scatter",
    "broadcast"; any other c10d op under its own name, e.g. "barrier", with its tensors' bytes).

    The mode is thread-local, like every dispatch mode: it sees collectives issued by this
    thread, which on CPU includes autograd's backward hooks (FSDP's reduce-scatter)."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func.__name__.split(".")[0]
            kind, index = _PAYLOAD.get(name, (name, None))
            payload = _nbytes(args[index]) if index is not None and index < len(args) else _nbytes(args)
            self.bytes[kind] += payload
            self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# Projections to real models, from their published shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GQALlama:
    """A Llama-2 shape with grouped-query attention (GQA: Ainslie et al. 2023, arXiv:2305.13245):
    the keys and values have ``n_kv_heads`` heads of size d / n_heads, shared by groups of query
    heads, so k and v project d -> n_kv_heads · d / n_heads instead of d -> d.
    ``architectures.Architecture`` has no GQA; with n_kv_heads = n_heads this is its Llama."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int

    def block_matrices(self) -> dict[str, tuple[int, int]]:
        """role -> (in_features, out_features) of one block (no biases in Llama)."""
        d, kv = self.d_model, self.n_kv_heads * self.d_model // self.n_heads
        return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
                "gate": (d, self.d_ff), "up": (d, self.d_ff), "down": (self.d_ff, d)}

    def total_parameters(self) -> int:
        """Embedding + untied output head, per block its matrices and two RMSNorm scales, and
        the final RMSNorm."""
        d = self.d_model
        block = sum(i * o for i, o in self.block_matrices().values()) + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * block + d

    def lora_parameters(self, rank: int, roles=("q", "v")) -> int:
        """n_layers · Σ r·(in + out) over the adapted matrices."""
        matrices = self.block_matrices()
        return self.n_layers * sum(rank * sum(matrices[role]) for role in roles)


#: Llama-2-70B (Touvron et al. 2023, Table 1 and the released ``config.json``: hidden_size 8192,
#: num_hidden_layers 80, num_attention_heads 64, num_key_value_heads 8, intermediate_size 28672,
#: vocab_size 32000). Total 68,976,648,192: the count Hugging Face's ``LlamaForCausalLM`` has
#: with this config (tests/test_distributed.py builds it on the meta device and counts).
LLAMA_2_70B = GQALlama("Llama-2-70B", 32000, 8192, 80, 64, 8, 28672)


def model_sizes(rank: int = 8) -> list[dict]:
    """(name, total parameters, LoRA trainable parameters at ``rank``) of GPT-2 124M, Llama-2-7B
    and Llama-2-70B. LoRA adapts the attention as in the paper's default (§7.1): q and v for
    Llama, GPT-2's fused q,k,v matrix ``c_attn`` (PEFT's default for GPT-2). No new head: the
    models keep their LM head, as in instruction tuning."""
    rank = check_int(rank, "rank", minimum=1)
    rows = []
    for key in ("gpt2-small", "llama-2-7b"):
        arch = architectures.get_architecture(key)
        target = architectures.available_targets(arch)[0]  # "q,v", or "q,k,v" for the fused GPT-2
        rows.append({"model": arch.name.replace("GPT-2 small", "GPT-2 124M"),
                     "total": architectures.total_parameters(arch),
                     "lora": architectures.lora_parameters(arch, rank, target), "targets": target})
    rows.append({"model": LLAMA_2_70B.name, "total": LLAMA_2_70B.total_parameters(),
                 "lora": LLAMA_2_70B.lora_parameters(rank), "targets": "q,v"})
    return rows


def ring_factors(world_size: int) -> dict[str, float]:
    """Bytes each process sends per payload byte in a ring of ``world_size`` processes."""
    n = check_int(world_size, "world_size", minimum=1)
    share = (n - 1) / n
    return {"all_reduce": 2 * share, "all_gather": share, "reduce_scatter": share}


def step_traffic(frozen: int, trainable: int, world_size: int, bytes_per_value: int = 2) -> dict[str, dict]:
    """Payload and bytes sent per process per optimizer step, for DDP and for FSDP (ZeRO-3 with
    parameters resharded after forward, so every weight is gathered in forward and again in
    backward), for a model of ``frozen + trainable`` parameters (full fine-tuning: frozen = 0).

    Also the training memory per process of weights, gradients and AdamW state (activations
    excluded) in mixed precision: ``bytes_per_value`` per weight and per gradient, plus 12 bytes
    (a float32 master weight, m and v) per trainable parameter (ZeRO paper §3.1: 16 bytes per
    trainable parameter in bf16); FSDP divides all of it by N."""
    frozen = check_int(frozen, "frozen", minimum=0)
    trainable = check_int(trainable, "trainable", minimum=1, hint="DDP and FSDP need something to train")
    n = check_int(world_size, "world_size", minimum=1)
    b = check_int(bytes_per_value, "bytes_per_value", minimum=1, hint="2 for bf16, 4 for float32")
    ring = ring_factors(n)
    weights = b * (frozen + trainable)
    memory = weights + b * trainable + 12 * trainable
    ddp_payload = b * trainable                                 # one all-reduce of the gradients
    gather_payload, scatter_payload = 2 * weights, b * trainable  # two all-gathers, one reduce-scatter
    return {
        "ddp": {"payload": ddp_payload, "sent": ring["all_reduce"] * ddp_payload, "memory": memory},
        "fsdp": {"payload": gather_payload + scatter_payload,
                 "sent": ring["all_gather"] * gather_payload + ring["reduce_scatter"] * scatter_payload,
                 "gather_payload": gather_payload, "scatter_payload": scatter_payload, "memory": memory / n},
    }


def projection_table(world_size: int = 8, rank: int = 8, bytes_per_value: int = 2,
                     link_gb_per_s: float = 100.0) -> list[dict]:
    """One row per (model, method, wrapper): bytes each GPU sends per step, the seconds a link of
    ``link_gb_per_s`` GB/s (10⁹ bytes/s, per direction) needs for them, and the training memory
    per GPU. A lower bound on communication time: real collectives add latency per call and
    overlap with compute."""
    link = check_number(link_gb_per_s, "link_gb_per_s", positive=True, hint="e.g. 100 (GB/s)")
    rows = []
    for size in model_sizes(rank):
        methods = (("full fine-tuning", 0, size["total"]),
                   (f"LoRA r={rank} ({size['targets']})", size["total"], size["lora"]))
        for method, frozen, trainable in methods:
            traffic = step_traffic(frozen, trainable, world_size, bytes_per_value)
            for wrapper in ("ddp", "fsdp"):
                t = traffic[wrapper]
                rows.append({"model": size["model"], "method": method, "wrapper": wrapper.upper(),
                             "trainable": trainable, "payload_bytes": t["payload"], "sent_bytes": t["sent"],
                             "link_seconds": t["sent"] / (link * 1e9), "memory_bytes": t["memory"]})
    return rows


# --------------------------------------------------------------------------------------------
# FSDP2's payloads, predicted from the parameter shapes
# --------------------------------------------------------------------------------------------
def fsdp_padded_numel(shape, world_size: int) -> int:
    """Numbers a parameter occupies when FSDP2 gathers it: ``fully_shard`` splits dim 0 into
    ``world_size`` chunks of ceil(rows / N) rows (the last one padded), so the gathered tensor has
    ceil(rows / N)·N rows. A 343-row embedding on 2 ranks gathers 344 rows."""
    n = check_int(world_size, "world_size", minimum=1)
    shape = tuple(shape)
    rest = 1
    for size in shape[1:]:
        rest *= size
    rows = shape[0] if shape else 1
    return -(-rows // n) * n * rest


def fsdp_step_payloads(model: torch.nn.Module, blocks, world_size: int, bytes_per_value: int = 4) -> dict[str, int]:
    """Predicted payload bytes of one FSDP2 step when every module in ``blocks`` and then the
    root ``model`` are ``fully_shard``-ed (the defaults: blocks resharded after forward, the root
    not):

    - forward all-gather: every parameter (each unit gathers its weights before it runs);
    - backward all-gather: the blocks' parameters again (freed after forward; backward needs W,
      frozen or not, to pass the gradient on: dx = dy · W);
    - reduce-scatter: the gradients, i.e. every trainable parameter."""
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    padded = {id(p): fsdp_padded_numel(p.shape, world_size) * bytes_per_value for p in model.parameters()}
    params = list(model.parameters())
    return {"forward all_gather": sum(padded[id(p)] for p in params),
            "backward all_gather": sum(padded[id(p)] for p in params if id(p) in in_blocks),
            "backward reduce_scatter": sum(padded[id(p)] for p in params if p.requires_grad)}
