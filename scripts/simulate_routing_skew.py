"""Routing skew and the expert placements: how evenly each spreads a token's expert reads over the workers.

Placements (refengine.partition.ExpertPartition), over 2 nodes unless --nodes says otherwise:

    shard       each expert whole on one node, balanced by bytes (--numa shard)
    contiguous  each layer's experts in one run per worker (MPI ranks, refengine.distributed)
    split       every expert's rows cut evenly over the nodes (--numa split)

Routing traces:

    recorded    refengine.generate.generate on the tiny MoE models of refengine.testing, sampling at
                temperature 1, with an observer that keeps every layer's ffn_moe_topk for every position
                (the prompt's and the generated tokens'): qwen3moe (8 experts, top 2), mixtral (4, top 2),
                deepseek2 (8, top 2, in 2 of 4 groups) and moe_spec(256) (256 experts, top 8 in 4 of 8
                groups, as DeepSeek-R1 routes). Their weights are random, so their routing is close to even.
    synthetic   DeepSeek-R1's shape: 58 MoE layers of 256 experts, 8 chosen per token. Each layer's experts
                get a Zipf popularity 1 / rank^s over a random order (s = 0 is uniform), and a token draws
                its 8 without replacement in proportion to it (Gumbel top-k).

For each trace, placement and node count, per token (the bytes of expert rows each node reads, from the
model's header; for synthetic traces R1's Q4_K_M rows: gate and up Q4_K, 4032 bytes a row, down Q4_K or,
in the use_more_bits layers, Q6_K, 1152 or 1680 bytes):

    token       the busiest node's bytes over the nodes' mean, the token's layers summed
    layer       the same with a barrier after every layer, as the engine runs: the sum over the layers of
                the busiest node's bytes over the sum of the means: what the token's time follows

each as the mean over the trace's tokens and the worst token.

    .venv/bin/python scripts/simulate_routing_skew.py                    # record, synthesize, print a table
    .venv/bin/python scripts/simulate_routing_skew.py --nodes 2,4 --json
    .venv/bin/python scripts/simulate_routing_skew.py --save-traces traces/   # then --traces traces/*.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from refengine.partition import ExpertLayer, ExpertPartition, expert_layers
from refengine.plan import assign_experts

RECORDED = ("qwen3moe", "mixtral", "deepseek2", "moe256")
ZIPF = (0.0, 0.5, 1.0, 1.5)
PLACEMENTS = ("shard", "contiguous", "split")
R1_LAYERS, R1_DENSE, R1_EXPERTS, R1_USED = 61, 3, 256, 8
Q4_K_ROW_7168, Q4_K_ROW_2048, Q6_K_ROW_2048 = 28 * 144, 8 * 144, 8 * 210


# -- traces ------------------------------------------------------------------------------------------


def record(arch: str, folder: Path, n_tokens: int, seed: int) -> tuple[np.ndarray, dict[int, ExpertLayer]]:
    """Every position's chosen experts (n_positions, n_moe_layers, k) of a generation on a tiny model."""
    from refengine.generate import generate
    from refengine.sampler import Sampler, SamplerConfig
    from refengine.session import Session
    from refengine.testing import moe_spec, write_tiny_model

    if arch == "moe256":
        path = write_tiny_model("deepseek2", folder / "moe256.gguf", spec=moe_spec(256))
    else:
        path = write_tiny_model(arch, folder / f"{arch}.gguf")
    session = Session.load(str(path))
    layers = expert_layers(session.gguf)
    steps: list[dict[int, np.ndarray]] = []

    def observe(name: str, x: np.ndarray) -> None:
        if name.startswith("ffn_moe_topk-"):
            if not steps or int(name.split("-")[1]) in steps[-1]:
                steps.append({})
            steps[-1][int(name.split("-")[1])] = np.asarray(x)

    class Recording:  # the model as generate sees it, with the observer on every forward pass
        def __init__(self, model):
            self.model = model

        def forward(self, tokens, cache, all_logits=True):
            return self.model.forward(tokens, cache, all_logits, observer=observe)

        def __getattr__(self, name):
            return getattr(self.model, name)

    prompt = session.tokenizer.encode("The history of the printing press begins with movable type")
    cache = session.new_cache(len(prompt) + n_tokens)
    sampler = Sampler(SamplerConfig(temperature=1.0, seed=seed))
    generate(Recording(session.model), session.tokenizer, cache, prompt, n_tokens, sampler)
    order = sorted(layers)
    chosen = np.concatenate([np.stack([step[il] for il in order], axis=1) for step in steps])  # (n_pos, n_layers, k)
    return chosen, layers


def r1_layers() -> dict[int, ExpertLayer]:
    """DeepSeek-R1's MoE layers at Q4_K_M: down in Q6_K where llama.cpp's use_more_bits says."""
    layers = {}
    for il in range(R1_DENSE, R1_LAYERS):
        more_bits = il < R1_LAYERS // 8 or il >= 7 * R1_LAYERS // 8 or (il - R1_LAYERS // 8) % 3 == 2
        row_bytes = {
            "ffn_gate_exps": Q4_K_ROW_7168,
            "ffn_up_exps": Q4_K_ROW_7168,
            "ffn_down_exps": Q6_K_ROW_2048 if more_bits else Q4_K_ROW_2048,
        }
        layers[il] = ExpertLayer(il, R1_EXPERTS, 2048, 7168, row_bytes)
    return layers


def zipf_trace(s: float, n_tokens: int, n_layers: int, seed: int) -> np.ndarray:
    """(n_tokens, n_layers, 8) experts drawn without replacement by a Zipf(s) popularity per layer."""
    rng = np.random.default_rng(seed)
    chosen = np.empty((n_tokens, n_layers, R1_USED), dtype=np.int64)
    for il in range(n_layers):
        popularity = 1.0 / np.arange(1, R1_EXPERTS + 1) ** s
        log_p = np.log(popularity / popularity.sum())[rng.permutation(R1_EXPERTS)]  # a random order per layer
        gumbel = rng.gumbel(size=(n_tokens, R1_EXPERTS))
        chosen[:, il] = np.argsort(-(log_p + gumbel), axis=1)[:, :R1_USED]  # Gumbel top-k: without replacement
    return chosen


# -- placements and the figures ----------------------------------------------------------------------


def partition(kind: str, layers: dict[int, ExpertLayer], workers: tuple[int, ...]) -> ExpertPartition:
    if kind == "split":
        return ExpertPartition.rows_of(layers, workers)
    if kind == "shard":
        units = {(il, e): el.expert_bytes for il, el in layers.items() for e in range(el.n_expert)}
        return ExpertPartition("experts", workers, layers, owners=assign_experts(units, list(workers)))
    owners = {}
    for il, el in layers.items():
        for k, worker in enumerate(workers):
            first, end = k * el.n_expert // len(workers), (k + 1) * el.n_expert // len(workers)
            owners.update({(il, e): worker for e in range(first, end)})
    return ExpertPartition("contiguous", workers, layers, owners=owners)


def reads(p: ExpertPartition, chosen: np.ndarray) -> np.ndarray:
    """(n_tokens, n_layers, n_workers) bytes each worker reads for each token and layer."""
    order = sorted(p.layers)
    out = np.zeros((chosen.shape[0], len(order), len(p.workers)), dtype=np.int64)
    for i, il in enumerate(order):
        el = p.layers[il]
        per_expert = np.array(  # (n_expert, n_workers): the bytes of each expert each worker computes
            [[el.bytes_of(*p.share(il, e, w)) for w in p.workers] for e in range(el.n_expert)], dtype=np.int64
        )
        out[:, i] = per_expert[chosen[:, i]].sum(axis=1)
    return out


def figures(read: np.ndarray) -> dict:
    token = read.sum(axis=1)  # (n_tokens, n_workers)
    token_ratio = token.max(axis=1) / token.mean(axis=1)
    layer_ratio = read.max(axis=2).sum(axis=1) / read.mean(axis=2).sum(axis=1)
    return {
        "token_mean": float(token_ratio.mean()),
        "token_worst": float(token_ratio.max()),
        "layer_mean": float(layer_ratio.mean()),
        "layer_worst": float(layer_ratio.max()),
    }


def simulate(traces: dict[str, tuple[np.ndarray, dict[int, ExpertLayer]]], node_counts: list[int]) -> list[dict]:
    rows = []
    for name, (chosen, layers) in traces.items():
        for n_nodes in node_counts:
            row = {"trace": name, "tokens": int(chosen.shape[0]), "nodes": n_nodes}
            for kind in PLACEMENTS:
                row[kind] = figures(reads(partition(kind, layers, tuple(range(n_nodes))), chosen))
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| trace | tokens | nodes | "
        + " | ".join(f"{k} token mean / worst | {k} layer mean / worst" for k in PLACEMENTS)
        + " |",
        "|---|---:|---:|" + "---:|---:|" * len(PLACEMENTS),
    ]
    for r in rows:
        cells = [
            f"{f['token_mean']:.3f} / {f['token_worst']:.3f} | {f['layer_mean']:.3f} / {f['layer_worst']:.3f}"
            for f in (r[k] for k in PLACEMENTS)
        ]
        lines.append(f"| {r['trace']} | {r['tokens']} | {r['nodes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(folder: Path, name: str, chosen: np.ndarray, layers: dict[int, ExpertLayer]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = np.array(
        [
            [il, el.n_expert, el.n_ff, el.n_embd, *(el.row_bytes[k] for k in sorted(el.row_bytes))]
            for il, el in layers.items()
        ]
    )
    np.savez_compressed(
        folder / f"{name}.npz", chosen=chosen, layers=table, kinds=np.array(sorted(layers[min(layers)].row_bytes))
    )


def load(path: Path) -> tuple[np.ndarray, dict[int, ExpertLayer]]:
    data = np.load(path)
    kinds = [str(k) for k in data["kinds"]]
    layers = {
        int(row[0]): ExpertLayer(
            int(row[0]), int(row[1]), int(row[2]), int(row[3]), dict(zip(kinds, map(int, row[4:]), strict=True))
        )
        for row in data["layers"]
    }
    return data["chosen"], layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2", help="comma-separated node counts (default 2)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per recorded trace")
    parser.add_argument("--synthetic-tokens", type=int, default=2000)
    parser.add_argument("--traces", nargs="*", type=Path, help="saved .npz traces instead of recording")
    parser.add_argument("--save-traces", type=Path, help="write every trace here as .npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    node_counts = [int(n) for n in args.nodes.split(",")]
    traces: dict[str, tuple[np.ndarray, dict[int, ExpertLayer]]] = {}
    if args.traces:
        traces = {path.stem: load(path) for path in args.traces}
    else:
        with tempfile.TemporaryDirectory() as folder:
            for arch in RECORDED:
                print(f"recording {arch} ...", file=sys.stderr)
                traces[f"recorded {arch}"] = record(arch, Path(folder), args.tokens, args.seed)
        for s in ZIPF:
            chosen = zipf_trace(s, args.synthetic_tokens, R1_LAYERS - R1_DENSE, args.seed)
            traces[f"zipf s={s} (R1 shape)"] = chosen, r1_layers()
    if args.save_traces:
        for name, (chosen, layers) in traces.items():
            save(
                args.save_traces,
                name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", ""),
                chosen,
                layers,
            )
    rows = simulate(traces, node_counts)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
