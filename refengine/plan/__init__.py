"""The memory plan: what a model needs at a context size, what this process may use, and a verdict.

`refengine plan MODEL --ctx N --numa MODE` reads the GGUF header (tensor names, types, shapes and
the `{arch}.*` keys) and the readings of refengine.system, nothing else, so it answers in well under
a second even for a 400 GB split model. `refengine generate` runs it first and stops on does_not_fit.

What the model needs
    weights       the tensors' bytes, by group: embeddings (token_embd, output), attention (attn_*),
                  dense FFN (other ffn_*, the router ffn_gate_inp included), routed experts (ffn_*_exps),
                  shared experts (ffn_*_shexp), other (norms, exp_probs_b, rope_freqs). They stay
                  file-backed: a read-only shared mapping, so they live in the page cache, never in
                  the process's anonymous memory.
    KV cache      what our KVCache allocates: every layer x n_head_kv x (key_length + value_length) per
                  position it keeps, in the compute dtype (4 bytes; 8 with --precision f64). A full-
                  attention layer keeps n_ctx positions; a sliding-window layer (gemma3's five local
                  layers in six) a ring of window + n_ubatch, as llama.cpp's iSWA cache does. With MLA
                  (a `{arch}.attention.kv_lora_rank` key, e.g. deepseek2) the compressed cache llama.cpp
                  keeps: n_layer x n_ctx x (kv_lora_rank + rope.dimension_count).
    activations   the largest transient of one forward step of n_batch tokens: n_batch is the
                  micro-batch (nn.N_UBATCH, 512, as llama.cpp's n_ubatch) or the prompt if shorter,
                  whatever the context. What is alive at the peak of a layer: the residual stream and its
                  norm (3 x n_batch x n_embd), q/k/v and their rotated copies, then the larger of the
                  attention's working set (its grouped queries, running output and the product of one key
                  block, and one block of scores: at most nn.ATTENTION_TILE_FLOATS, or the smallest key
                  block for every query row) and three FFN-width arrays (gate, its activation, the gated
                  product), with experts also each routed entry's output (n_batch x n_expert_used x
                  n_embd); plus one dequantized weight tile (nn.TILE_FLOATS) and one row of logits. The
                  tests check this against tracemalloc's peak over a real forward pass.
    runtime       the interpreter, numpy, numba and the tokenizer's vocabulary: measured 96 MiB + about
                  256 bytes per token (RssAnon of `refengine generate` on both bundled models), rounded up.
    address space what RLIMIT_AS counts: the whole mapping of every split, the anonymous memory, and
                  per thread a 64 MiB malloc arena and an 8 MiB stack that glibc reserves (virtual).

What this process may use ("room")
    The nodes it may allocate on: the cpuset's (Mems_allowed_list), narrowed by a bind memory policy
    (numactl -m). On each, what is free plus what the kernel can reclaim (file page cache, reclaimable
    slab), never more than MemAvailable, and never more than the cgroup's room: cgroup v1 and v2 both
    charge page cache to the cgroup, so the weights count against memory.max, memory.high (v2) and
    limit_in_bytes (v1). Of what the cgroup already holds (memory.current, usage_in_bytes), its file pages
    (memory.stat's active_file + inactive_file) are reclaimed within the limit, ours and those of whatever
    ran before alike; only the rest, anonymous memory above all, is taken from the limit. Swap is
    not counted (anonymous memory in swap would make every token wait on the disk). Pages of the file
    that are already cached on another node stay there and are used there; the plan assumes a cold cache.

Verdict
    fits             weights + anonymous memory fit in what is free now: after the first pass, nothing
                     is read twice.
    pages_from_disk  they fit only by evicting other files' page cache: until the kernel has made room,
                     the mapping is read from disk and speed is bound by the disk.
    does_not_fit     the anonymous memory (KV cache, activations, runtime) does not fit, so the OOM killer
                     ends the run, on the bound nodes or in the cgroup; or the weights and buffers do not
                     fit even with every reclaimable page dropped. Nothing is killed then, since the
                     kernel drops and re-reads clean file pages (ours included), but every token reads
                     the missing part of the model from disk again, hundreds of times slower than memory.
                     (Engines that copy weights into anonymous memory get killed here.) Also when
                     RLIMIT_AS is below the address space, so the mapping itself fails, or strict
                     overcommit (vm.overcommit_memory=2) leaves less commit than the buffers need.

Placement per node (--numa), for the verdict and for refengine.numa, which places the pages so
    off          no placement: the memory policy decides. interleave spreads pages evenly over its nodes;
                 prefer puts them on its node first; otherwise (default, bind) a page lands on the node
                 of the worker thread that first touches it, so the weights split over the allowed
                 nodes in proportion to the CPUs we may run on there. The buffers sit on the first of
                 those nodes (the main thread allocates and first writes them).
    distribute   threads pinned evenly over the nodes' allowed CPUs, pages where the kernel puts them:
                 on paper the same split as off; distribute makes it hold.
    shard        each routed expert (its slices of every ffn_*_exps tensor of its layer) lives on exactly
                 one node, balanced by bytes (largest first onto the least loaded node); everything else,
                 the KV cache and activations included, is interleaved over the allowed nodes. Its
                 placement is strict, so each node's share must fit on that node.
    split        every routed expert is cut by rows over the nodes with CPUs (refengine.partition), so each
                 node holds an even share of every expert; the rest as under shard, and as strict.
    Only shard's and split's per-node shares are checked node by node; the kernel moves the others'
    overflow to another allowed node.
"""

from refengine.plan.render import render
from refengine.plan.sizing import (
    GROUPS,
    ModelShape,
    Needs,
    PlanError,
    Sizer,
    activation_bytes,
    assign_experts,
    expert_units,
    kv_cache_bytes,
    size,
    weight_bytes,
    weight_group,
)
from refengine.plan.verdict import NUMA_MODES, VERDICTS, DoesNotFit, Plan, Room, measure_room, open_model, plan

__all__ = [
    "GROUPS",
    "NUMA_MODES",
    "VERDICTS",
    "DoesNotFit",
    "ModelShape",
    "Needs",
    "Plan",
    "PlanError",
    "Room",
    "Sizer",
    "activation_bytes",
    "assign_experts",
    "expert_units",
    "kv_cache_bytes",
    "measure_room",
    "open_model",
    "plan",
    "render",
    "size",
    "weight_bytes",
    "weight_group",
]
