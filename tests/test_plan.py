"""The memory plan and the system readings behind it.

The machines are fixture folders under tests/fixtures/sysroot that mirror the real paths (proc/meminfo,
proc/self/status, sys/devices/system/node/nodeN/meminfo, sys/fs/cgroup/...). The 400 GB model is a
DeepSeek-R1 header over sparse split files: the tensors' shapes and types are real, their data is
holes, so the plan must never read it. Expected byte counts come from gguf's GGML_QUANT_SIZES and the
shapes written, not from our reader; the KV and activation figures are checked against what our own
KVCache and forward pass allocate on the two real models.
"""

import ctypes
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_builder import ARRAY, INT32, STRING, UINT16, UINT32, GGUFBuilder, align

import refengine.buffers
from refengine.cli import EXIT_DOES_NOT_FIT, EXIT_ERROR, EXIT_USAGE, main
from refengine.gguf import open_gguf
from refengine.plan import GROUPS, assign_experts, expert_units, plan, render, size, weight_group
from refengine.system import SystemReadError, read_system

FIXTURES = Path(__file__).parent / "fixtures" / "sysroot"
GIB = 1 << 30


def machine(name: str):
    return read_system(FIXTURES / name)


# --- A DeepSeek-R1 Q4_K_M-like split model: real header, sparse data --------------------------------

N_LAYER, N_DENSE, N_EXPERT, N_EMBD, N_VOCAB = 61, 3, 256, 7168, 129280
KV_LORA_RANK, N_ROT = 512, 64


def r1_tensors() -> list[tuple[str, tuple[int, ...], T]]:
    """(name, ne, type) of DeepSeek-R1 in a Q4_K_M-like mix; ne in GGUF order (row length first)."""
    E, FF, FFE = N_EMBD, 18432, 2048
    out = [("token_embd.weight", (E, N_VOCAB), T.Q4_K)]
    for il in range(N_LAYER):
        b = f"blk.{il}."
        out += [
            (b + "attn_norm.weight", (E,), T.F32),
            (b + "attn_q_a_norm.weight", (1536,), T.F32),
            (b + "attn_kv_a_norm.weight", (KV_LORA_RANK,), T.F32),
            (b + "attn_q_a.weight", (E, 1536), T.Q4_K),
            (b + "attn_q_b.weight", (1536, 128 * 192), T.Q4_K),
            (b + "attn_kv_a_mqa.weight", (E, KV_LORA_RANK + N_ROT), T.Q4_K),
            (b + "attn_kv_b.weight", (KV_LORA_RANK, 128 * 256), T.Q6_K),
            (b + "attn_output.weight", (128 * 128, E), T.Q4_K),
            (b + "ffn_norm.weight", (E,), T.F32),
        ]
        if il < N_DENSE:
            out += [
                (b + "ffn_gate.weight", (E, FF), T.Q4_K),
                (b + "ffn_up.weight", (E, FF), T.Q4_K),
                (b + "ffn_down.weight", (FF, E), T.Q6_K),
            ]
            continue
        # Q6_K for the layers llama.cpp's use_more_bits picks, Q4_K elsewhere: experts differ in size by layer.
        more_bits = il < N_LAYER // 8 or il >= 7 * N_LAYER // 8 or (il - N_LAYER // 8) % 3 == 2
        out += [
            (b + "ffn_gate_inp.weight", (E, N_EXPERT), T.F32),
            (b + "exp_probs_b.bias", (N_EXPERT,), T.F32),
            (b + "ffn_gate_exps.weight", (E, FFE, N_EXPERT), T.Q4_K),
            (b + "ffn_up_exps.weight", (E, FFE, N_EXPERT), T.Q4_K),
            (b + "ffn_down_exps.weight", (FFE, E, N_EXPERT), T.Q6_K if more_bits else T.Q4_K),
            (b + "ffn_gate_shexp.weight", (E, FFE), T.Q4_K),
            (b + "ffn_up_shexp.weight", (E, FFE), T.Q4_K),
            (b + "ffn_down_shexp.weight", (FFE, E), T.Q6_K),
        ]
    out += [("output_norm.weight", (E,), T.F32), ("output.weight", (E, N_VOCAB), T.Q6_K)]
    return out


def nbytes(ne: tuple[int, ...], ggml_type: T) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(ne, dtype=object)) // block_size * type_size


def r1_keys(builder: GGUFBuilder) -> None:
    for key, value in [
        ("block_count", N_LAYER),
        ("context_length", 163840),
        ("embedding_length", N_EMBD),
        ("feed_forward_length", 18432),
        ("attention.head_count", 128),
        ("attention.head_count_kv", 1),  # llama.cpp's MLA conversion: one latent "head"
        ("attention.key_length", KV_LORA_RANK + N_ROT),
        ("attention.value_length", KV_LORA_RANK),
        ("attention.key_length_mla", 192),
        ("attention.value_length_mla", 128),
        ("attention.q_lora_rank", 1536),
        ("attention.kv_lora_rank", KV_LORA_RANK),
        ("rope.dimension_count", N_ROT),
        ("leading_dense_block_count", N_DENSE),
        ("expert_feed_forward_length", 2048),
        ("expert_count", N_EXPERT),
        ("expert_shared_count", 1),
        ("expert_used_count", 8),
    ]:
        builder.kv(f"deepseek2.{key}", UINT32, value)


@pytest.fixture(scope="session")
def deepseek_r1(tmp_path_factory) -> tuple[Path, list]:
    """DeepSeek-R1 as 9 sparse splits, 377 GiB of tensor data that is all holes."""
    folder = tmp_path_factory.mktemp("r1")
    tensors = r1_tensors()
    n_splits = 9
    per_split = sum(nbytes(ne, t) for _, ne, t in tensors) / n_splits
    groups: list[list] = [[] for _ in range(n_splits)]
    filled = 0
    for tensor in tensors:
        groups[min(int(filled // per_split), n_splits - 1)].append(tensor)
        filled += nbytes(tensor[1], tensor[2])
    paths = []
    for i, group in enumerate(groups):
        builder = GGUFBuilder()
        builder.kv("general.architecture", STRING, "deepseek2")
        builder.kv("split.no", UINT16, i).kv("split.count", UINT16, n_splits)
        if i == 0:
            builder.kv("split.tensors.count", INT32, len(tensors))
            r1_keys(builder)
            builder.kv("tokenizer.ggml.model", STRING, "gpt2")
            builder.kv("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{j}" for j in range(N_VOCAB)]))
        offset = 0
        for name, ne, ggml_type in group:
            builder.tensor(name, ne, ggml_type, data=b"", offset=offset)
            offset = align(offset + nbytes(ne, ggml_type), builder.alignment)
        header = builder.header()
        path = folder / f"DeepSeek-R1-Q4_K_M-{i + 1:05d}-of-{n_splits:05d}.gguf"
        with open(path, "wb") as fh:
            fh.write(header)
            fh.truncate(align(len(header), builder.alignment) + offset)  # sparse: the data are holes
        paths.append(path)
    return paths[0], tensors


def test_split_400gb_model_is_planned_from_its_header_alone(deepseek_r1):
    first, tensors = deepseek_r1
    system = machine("two_nodes")
    start = time.perf_counter()
    p = plan(open_gguf(first), system, n_ctx=4096)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"the plan took {elapsed:.2f} s"  # a functional bound: it must not touch the data

    expected = dict.fromkeys(GROUPS, 0)
    for name, ne, ggml_type in tensors:
        expected[weight_group(name)] += nbytes(ne, ggml_type)
    experts = sum(nbytes(ne, t) for name, ne, t in tensors if name.endswith("_exps.weight"))
    assert p.needs.weights == expected
    assert p.needs.weights["routed_experts"] == experts
    assert p.needs.weights["shared_experts"] == sum(nbytes(ne, t) for name, ne, t in tensors if "_shexp." in name)
    assert round(p.needs.weights_total / GIB) == 377
    assert p.n_splits == 9
    assert p.needs.mapping == sum(path.stat().st_size for path in first.parent.iterdir())
    # MLA's compressed cache, float32: per layer and position, kv_lora_rank + rope dims
    assert p.needs.kv_cache == N_LAYER * 4096 * (KV_LORA_RANK + N_ROT) * 4
    assert p.verdict == "fits", p.message()


def test_weight_groups_follow_gguf_names():
    cases = {
        "token_embd.weight": "embeddings",
        "output.weight": "embeddings",
        "output_norm.weight": "other",
        "blk.0.attn_kv_a_mqa.weight": "attention",
        "blk.0.attn_kv_a_norm.weight": "other",
        "blk.3.ffn_gate_exps.weight": "routed_experts",
        "blk.3.ffn_down_exps.bias": "routed_experts",
        "blk.3.ffn_up_shexp.weight": "shared_experts",
        "blk.3.ffn_gate_inp_shexp.weight": "shared_experts",
        "blk.3.ffn_gate_inp.weight": "dense_ffn",
        "blk.0.ffn_down.weight": "dense_ffn",
        "blk.3.exp_probs_b.bias": "other",
        "rope_freqs.weight": "other",
    }
    assert {name: weight_group(name) for name in cases} == cases


# --- DeepSeek-R1 on 2 nodes x 256 GiB, the model bound to node 1 ------------------------------------


def test_numactl_m1_confines_the_weights_to_one_node(deepseek_r1):
    p = plan(open_gguf(deepseek_r1[0]), machine("two_nodes_bind1"), n_ctx=4096)
    # Nothing would be killed (file pages are dropped and re-read), but every token would read
    # 126 GiB of the model from disk again: it does not fit.
    assert p.verdict == "does_not_fit"
    message = p.message()
    for needle in ("numactl -m 1", "node 1 (251 GiB available)", "377 GiB", "drop -m 1", "--numa shard"):
        assert needle in message, message
    assert [share.node for share in p.nodes] == [1]
    assert p.nodes[0].weights == p.needs.weights_total


def test_cpuset_confinement_is_named_as_such(deepseek_r1):
    p = plan(open_gguf(deepseek_r1[0]), machine("two_nodes_cpuset1"), n_ctx=4096)
    assert p.verdict == "does_not_fit"
    assert "the cpuset (Mems_allowed_list 1) confines this process to node 1" in p.message()
    assert "cpuset-mems" in p.message()


def test_both_nodes_allowed_fits(deepseek_r1):
    p = plan(open_gguf(deepseek_r1[0]), machine("two_nodes"), n_ctx=4096)
    assert p.verdict == "fits" and p.actions == ()
    # off: first touch by threads spread over both nodes' 64 CPUs each
    assert [share.node for share in p.nodes] == [0, 1]
    assert abs(p.nodes[0].weights - p.nodes[1].weights) <= 1
    assert sum(share.total for share in p.nodes) == p.needs.weights_total + p.needs.anon


def test_buffers_that_cannot_fit_on_the_bound_node_do_not_fit(deepseek_r1):
    gguf = open_gguf(deepseek_r1[0])
    system = machine("two_nodes_bind1")
    p = plan(gguf, system, n_ctx=2_000_000)  # 61 layers x 2M positions x 576 floats: 262 GiB of MLA cache
    assert p.verdict == "does_not_fit"
    assert "numactl -m 1 confines this process to node 1" in p.message()
    largest = int(p.actions[0].removeprefix("lower --ctx to ").removesuffix(" or less"))
    # At the largest context the buffers fit and only the weights are too big for node 1.
    assert "the weights need" in plan(gguf, system, n_ctx=largest).message()
    too_long = plan(gguf, system, n_ctx=largest + 1).message()
    assert f"the buffers need 251 GiB (KV cache at --ctx {largest + 1}" in too_long


@pytest.mark.parametrize("n_ctx", [32768, 131072])
def test_long_contexts_are_sized_by_the_micro_batch_and_the_mla_cache(deepseek_r1, tmp_path, n_ctx):
    """Prompts run in micro-batches, so activations do not grow with the context (they were 1.67 TB at
    32768 when a prompt was one batch); what grows is the MLA cache, 61 layers x (512 + 64) floats per
    position: 4.6 GB at 32k, 18.4 GB at 128k in float32. The verdict turns on it and names it."""
    gguf = open_gguf(deepseek_r1[0])
    p = plan(gguf, machine("two_nodes"), n_ctx=n_ctx)
    assert p.n_batch == 512
    assert p.needs.activations <= 4 * GIB
    assert p.needs.kv_cache == 61 * n_ctx * (512 + 64) * 4
    assert p.verdict == "fits", p.message()
    assert f"KV cache at --ctx {n_ctx} {size(p.needs.kv_cache)}" in p.message()
    # A cgroup limit between the weights with every buffer but the cache, and the weights with the cache.
    root = shutil.copytree(FIXTURES / "cgroup_v2", tmp_path / "root")
    limit = p.needs.weights_total + p.needs.anon - p.needs.kv_cache // 2
    (root / "sys/fs/cgroup/system.slice/refengine.service/memory.max").write_text(f"{limit}\n")
    (root / "sys/fs/cgroup/system.slice/memory.max").write_text("max\n")
    tight = plan(gguf, read_system(root), n_ctx=n_ctx)
    assert tight.verdict == "does_not_fit", tight.message()
    assert f"KV cache at --ctx {n_ctx} {size(p.needs.kv_cache)}" in tight.message()
    smaller = int(re.search(r"lower --ctx to (\d+)", tight.message()).group(1))
    assert n_ctx // 2 <= smaller < n_ctx and plan(gguf, read_system(root), n_ctx=smaller).verdict == "fits"


def test_fitting_only_by_evicting_page_cache_pages_from_disk(deepseek_r1, tmp_path):
    root = shutil.copytree(FIXTURES / "two_nodes", tmp_path / "root")
    for node in (0, 1):  # most of each node's memory is other files' page cache
        meminfo = root / f"sys/devices/system/node/node{node}/meminfo"
        text = re.sub(r"MemFree: +\d+", "MemFree: 100000000", meminfo.read_text())
        meminfo.write_text(re.sub(r"Inactive\(file\): +\d+", "Inactive(file): 158000000", text))
    p = plan(open_gguf(deepseek_r1[0]), read_system(root), n_ctx=4096)
    assert p.verdict == "pages_from_disk", p.message()
    assert "only by evicting" in p.message() and "disk" in p.message()
    assert plan(open_gguf(deepseek_r1[0]), machine("two_nodes"), n_ctx=4096).verdict == "fits"


# --- Placements ----------------------------------------------------------------------------------


def test_snc4_shard_places_each_expert_on_one_node_balanced_by_bytes(deepseek_r1):
    gguf = open_gguf(deepseek_r1[0])
    system = machine("snc4")
    p = plan(gguf, system, n_ctx=4096, numa="shard")
    assert p.verdict == "fits", p.message()
    assert [share.node for share in p.nodes] == [0, 1, 2, 3]
    units = expert_units(gguf)
    assert len(units) == (N_LAYER - N_DENSE) * N_EXPERT
    assert sum(units.values()) == p.needs.weights["routed_experts"]
    placed = assign_experts(units, [0, 1, 2, 3])
    per_node = [sum(b for key, b in units.items() if placed[key] == node) for node in range(4)]
    assert max(per_node) - min(per_node) <= max(units.values())  # balanced to within one expert
    assert sum(share.experts for share in p.nodes) == len(units)
    assert sum(share.total for share in p.nodes) == p.needs.weights_total + p.needs.anon
    # distribute: every node has 32 of the 128 CPUs, so a quarter of the weights each
    d = plan(gguf, system, n_ctx=4096, numa="distribute")
    assert max(s.weights for s in d.nodes) - min(s.weights for s in d.nodes) <= 3


@pytest.mark.parametrize("policy, expected", [("interleave:0-1", [0.5, 0.5]), ("prefer:1", [0.0, 1.0])])
def test_off_follows_the_memory_policy(deepseek_r1, tmp_path, policy, expected):
    """numactl --interleave=all spreads the pages evenly; --preferred=1 puts them on node 1 first."""
    root = shutil.copytree(FIXTURES / "two_nodes", tmp_path / "root")
    (root / "proc/self/numa_maps").write_text(f"55d0c8a00000 {policy} file=/usr/bin/python3.11 mapped=1 N0=1\n")
    p = plan(open_gguf(deepseek_r1[0]), read_system(root), n_ctx=4096)
    assert str(p.system.policy) == policy
    total = p.needs.weights_total
    assert [round(share.weights / total, 3) for share in p.nodes] == expected


def test_shard_overflowing_a_node_pages_from_disk(deepseek_r1, tmp_path):
    root = shutil.copytree(FIXTURES / "snc4", tmp_path / "snc4")
    meminfo = root / "sys/devices/system/node/node2/meminfo"
    meminfo.write_text(meminfo.read_text().replace("130000000 kB", " 30000000 kB"))  # node 2: 30 GB free
    p = plan(open_gguf(deepseek_r1[0]), read_system(root), n_ctx=4096, numa="shard")
    assert p.verdict == "pages_from_disk"
    assert "--numa shard node 2" in p.message() and "--numa distribute" in p.message()


def test_numa_balancing_note(deepseek_r1):
    p = plan(open_gguf(deepseek_r1[0]), machine("two_nodes"), n_ctx=4096, numa="shard")
    assert any("sysctl kernel.numa_balancing=0" in note for note in p.notes)


# --- Limits: cgroups, RLIMIT_AS -------------------------------------------------------------------


def test_cgroup_v2_limit_counts_the_page_cache(deepseek_r1, smollm_path):
    system = machine("cgroup_v2")
    assert not system.numa_dirs and len(system.nodes) == 1  # no NUMA folders: the machine is one node
    assert system.cgroup.limit == 64 * GIB
    assert system.cgroup.file == "/sys/fs/cgroup/system.slice/refengine.service/memory.max"
    p = plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096)
    assert p.verdict == "does_not_fit"
    assert "cgroup memory limit is 64.0 GiB" in p.message() and "MemoryMax" in p.message()
    assert plan(open_gguf(smollm_path), system, n_ctx=4096).verdict == "fits"


def test_cgroup_v1_limit(smollm_path):
    system = machine("cgroup_v1")
    assert system.cgroup.version == 1 and system.cgroup.limit == 64 << 20
    p = plan(open_gguf(smollm_path), system, n_ctx=256)
    assert p.verdict == "does_not_fit"  # the interpreter alone is more than 64 MiB
    assert "/sys/fs/cgroup/memory/docker/3f2a/memory.limit_in_bytes" in p.message()


def test_rlimit_as_below_the_mapping(deepseek_r1, smollm_path):
    system = machine("rlimit_as")
    assert system.rlimit_as == 8 * GIB
    p = plan(open_gguf(deepseek_r1[0]), system, n_ctx=4096)
    assert p.verdict == "does_not_fit" and "ulimit -v" in p.message()
    assert p.needs.address_space > p.needs.mapping + p.needs.anon
    assert plan(open_gguf(smollm_path), system, n_ctx=4096).verdict == "fits"


# --- Reading the files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative, text",
    [
        ("proc/meminfo", "MemTotal:       lots kB\n"),
        ("proc/meminfo", "this line has no colon\n"),
        ("sys/devices/system/node/node1/meminfo", "Node 1 MemFree: 1 kB\n"),  # no MemTotal
        ("sys/devices/system/node/node1/cpulist", "64-x\n"),
        ("proc/self/status", "Mems_allowed_list:\t1-0\n"),
        ("proc/self/status", "Cpus_allowed_list:\t0-99999999999\n"),
        ("proc/self/numa_maps", "55d0c8a00000 sometimes:1 file=/x\n"),
        ("proc/self/cgroup", "garbage\n"),
        ("proc/self/limits", "Max address space         lots       unlimited      bytes\n"),
        ("proc/sys/kernel/numa_balancing", "yes\n"),
    ],
)
def test_malformed_file_is_one_line_naming_it(tmp_path, relative, text):
    root = shutil.copytree(FIXTURES / "two_nodes_bind1", tmp_path / "root")
    (root / relative).write_text(text)
    with pytest.raises(SystemReadError) as raised:
        read_system(root)
    message = str(raised.value)
    assert str(root / relative) in message and "\n" not in message


def test_malformed_cgroup_limit(tmp_path):
    root = shutil.copytree(FIXTURES / "cgroup_v2", tmp_path / "root")
    (root / "sys/fs/cgroup/system.slice/memory.max").write_text("64G\n")
    with pytest.raises(SystemReadError, match="memory.max"):
        read_system(root)


def test_missing_files_mean_unknown(tmp_path, smollm_path):
    system = read_system(tmp_path)
    assert system.mem_total is None and system.nodes == () and system.cgroup is None
    assert system.rlimit_as is None and str(system.policy) == "default"
    p = plan(open_gguf(smollm_path), system, n_ctx=64)
    assert p.room is None and "unknown" in p.message()


def test_this_machine_live():
    s = read_system()
    assert s.mem_total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < s.mem_available <= s.mem_total
    assert s.cpus_allowed == frozenset(os.sched_getaffinity(0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    assert s.rlimit_as == (None if soft == resource.RLIM_INFINITY else soft)
    assert s.nodes and all(0 < n.available <= n.total for n in s.memory_nodes)
    if s.numa_dirs:
        assert sum(n.total for n in s.nodes) == s.mem_total  # the nodes' MemTotal add up to the machine's
        assert s.mems_allowed <= {n.id for n in s.nodes}
        assert frozenset().union(*(n.cpus for n in s.nodes)) >= s.cpus_allowed
    assert s.numa_balancing in (None, 0, 1, 2, 3)


def test_live_limits_and_memory_policy_are_read_from_proc_self():
    """A child process lowers RLIMIT_AS and binds its memory to node 0; its readings must show both."""
    numbers = {"x86_64": (238, 239), "aarch64": (237, 236)}.get(platform.machine())  # set_, get_mempolicy
    if numbers is None:
        pytest.skip(f"no mempolicy syscall numbers for {platform.machine()}")
    syscall, get_mempolicy = numbers
    mode = ctypes.c_int()
    if ctypes.CDLL(None).syscall(get_mempolicy, ctypes.byref(mode), None, 0, None, 0) != 0:
        pytest.skip("this kernel has no NUMA memory policies")
    child = f"""
import ctypes, resource
from refengine.system import read_system
resource.setrlimit(resource.RLIMIT_AS, ({64 << 30}, resource.getrlimit(resource.RLIMIT_AS)[1]))
mask = ctypes.c_ulong(1)
assert ctypes.CDLL(None).syscall({syscall}, 2, ctypes.byref(mask), 64) == 0  # MPOL_BIND to node 0
s = read_system()
print(s.rlimit_as, s.policy)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(64 << 30), "bind:0"]


# --- Figures against what the engine really allocates ------------------------------------------------


@pytest.mark.parametrize("itemsize, dtype", [(4, np.float32), (8, np.float64)])
def test_kv_cache_is_what_our_cache_allocates(gemma_path, smollm_path, itemsize, dtype):
    from refengine.arch import load_model

    for path in (gemma_path, smollm_path):
        gguf = open_gguf(path)
        cache = load_model(gguf, dtype).new_cache(1000)
        assert plan(gguf, machine("two_nodes"), n_ctx=1000, itemsize=itemsize).needs.kv_cache == cache.nbytes


def forward_peak(model, cache, tokens: np.ndarray) -> int:
    """tracemalloc's peak (bytes above what was allocated before) over a prefill of tokens from position 0."""
    cache.n_past = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model.forward(tokens, cache, all_logits=False)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n_tok", [64, 1100])
def test_activations_bound_a_real_forward_pass(smollm_path, n_tok):
    """tracemalloc's peak over a prefill of n_tok tokens, against the estimate (numpy reports to tracemalloc).
    1,100 tokens are three micro-batches: the estimate is one micro-batch's, whatever the prompt."""
    from refengine.arch import load_model

    gguf = open_gguf(smollm_path)
    model = load_model(gguf)
    cache = model.new_cache(n_tok)
    tokens = (np.arange(n_tok) * 7 + 5) % model.config.n_vocab
    model.forward(tokens[:2], cache, all_logits=False)  # compile and warm up outside the measurement
    peak = forward_peak(model, cache, tokens)
    estimate = plan(gguf, machine("two_nodes"), n_ctx=n_tok).needs.activations
    # The estimate counts a whole weight tile; smollm's matrices are smaller than one.
    tile_bytes = refengine.buffers.TILE_FLOATS * 4
    assert peak <= estimate <= 2 * peak + tile_bytes, (peak, estimate)


@pytest.mark.parametrize("numerics", ["exact", "ggml"])
@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_activations_bound_a_mixture_of_experts_batch(tiny_model, arch, numerics):
    """The same for a mixture of experts' batch (every routed entry's intermediate and output), on the tiny
    "bigger" models quantized Q4_K_M, so that the grouped expert kernels of numerics ggml run."""
    from refengine.arch import load_model
    from refengine.testing import spec_for, write_tiny_model
    from refengine.testing.tiny import quantize_q4_k_m

    folder = tiny_model(arch).parent
    f32 = write_tiny_model(arch, folder / f"{arch}-bigger-plan.gguf", spec_for(arch, "bigger"))
    path = quantize_q4_k_m(f32, folder / f"{arch}-bigger-plan-q4_k_m.gguf")
    gguf = open_gguf(path)
    model = load_model(gguf, np.float32, numerics)
    n_tok = 300
    cache = model.new_cache(n_tok)
    tokens = (np.arange(n_tok) * 7 + 5) % model.config.n_vocab
    model.forward(tokens, cache, all_logits=False)  # compile and warm up outside the measurement
    peak = forward_peak(model, cache, tokens)
    estimate = plan(gguf, machine("two_nodes"), n_ctx=n_tok).needs.activations
    assert peak <= estimate, (peak, estimate)


# --- The command line -----------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_json(capsys, deepseek_r1):
    code, out, _ = run(capsys, "plan", deepseek_r1[0], "--json", "--sysroot", FIXTURES / "two_nodes_bind1")
    assert code == 0
    result = json.loads(out)
    assert result["verdict"] == "does_not_fit"
    assert result["needs"]["weights"]["routed_experts"] > 0 and result["needs"]["kv_cache"] > 0
    assert result["system"]["memory_policy"] == "bind:1"
    assert [n["node"] for n in result["nodes"]] == [1]
    assert "drop -m 1" in result["message"]


def test_cli_plan_text(capsys, deepseek_r1):
    code, out, _ = run(capsys, "plan", deepseek_r1[0], "--numa", "shard", "--sysroot", FIXTURES / "snc4")
    assert code == 0
    assert "verdict: fits" in out and "routed experts" in out and "(9 splits)" in out
    p = plan(open_gguf(deepseek_r1[0]), machine("snc4"), n_ctx=4096, numa="shard")
    assert out.strip() == render(p)


def test_cli_plan_errors_are_one_line(capsys, tmp_path, smollm_path):
    code, _, err = run(capsys, "plan", smollm_path, "--numa", "everywhere")
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1
    root = shutil.copytree(FIXTURES / "two_nodes", tmp_path / "root")
    (root / "proc/meminfo").write_text("MemTotal: many\n")
    code, _, err = run(capsys, "plan", smollm_path, "--sysroot", root)
    assert code == EXIT_ERROR and err.count("\n") == 1 and "proc/meminfo" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "keys, needle",
    [
        ({}, "'llama.block_count'"),
        ({"llama.block_count": (UINT32, 2), "llama.embedding_length": (UINT32, 64)}, "'llama.attention.head_count'"),
        ({"llama.block_count": (STRING, "two")}, "llama.block_count is a string, expected an integer"),
    ],
)
def test_cli_plan_bad_header_keys(capsys, tmp_path, keys, needle):
    builder = GGUFBuilder().kv("general.architecture", STRING, "llama")
    for key, (value_type, value) in keys.items():
        builder.kv(key, value_type, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(builder.build())
    code, _, err = run(capsys, "plan", path, "--sysroot", FIXTURES / "two_nodes")
    assert code == EXIT_ERROR and len(err.strip().splitlines()) == 1
    assert needle in err and "bad.gguf" in err


def test_generate_stops_before_loading_when_it_cannot_fit(capsys, monkeypatch, smollm_path):
    from refengine.session import Session

    argv = ["generate", "-m", smollm_path, "-n", "1", "-c", "64", "--temp", "0", "--json", "Hello"]
    with monkeypatch.context() as patch:
        patch.setattr(Session, "load", lambda *a, **k: pytest.fail("the model was loaded before the plan"))
        code, out, err = run(capsys, *argv, "--sysroot", FIXTURES / "cgroup_v1")
    assert code == EXIT_DOES_NOT_FIT == 3
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "does not fit" in err and "memory.limit_in_bytes" in err
    # --no-plan skips the check and runs; the anonymous memory it really used is within the plan's figure
    # (in a process of its own: this one holds whatever earlier tests allocated)
    cmd = [
        sys.executable,
        "-m",
        "refengine.cli",
        *map(str, argv),
        "--sysroot",
        str(FIXTURES / "cgroup_v1"),
        "--no-plan",
    ]
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    out = child.stdout
    planned = plan(open_gguf(smollm_path), read_system(), n_ctx=64).needs.anon
    assert json.loads(out)["peak_rss_anon"] <= planned


def test_plan_under_a_ulimit_too_small_to_map_the_model(deepseek_r1):
    """The mapping itself fails under ulimit -v 8G: that is the verdict, not a broken file."""
    child = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({8 << 30}, resource.getrlimit(resource.RLIMIT_AS)[1]))
from refengine.cli import main
sys.exit(main(["plan", {str(deepseek_r1[0])!r}]))
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == EXIT_DOES_NOT_FIT, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ulimit -v limits this process to 8.0 GiB" in result.stderr and "377 GiB" in result.stderr


def test_help_documents_sysroot_and_exit_status(capsys):
    _, out, _ = run(capsys, "plan", "-h")
    assert "--sysroot" in out and "--numa" in out
    _, out, _ = run(capsys, "generate", "-h")
    assert "--no-plan" in out and "3" in out
