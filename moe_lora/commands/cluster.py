"""Cluster the instructions of a JSONL data set offline (MoCLE's cluster-conditioned routing, router 'cluster').

    moe-lora cluster --data train.jsonl --k 8 --out runs/train_clustered.jsonl

Each record's instruction ('prompt', else 'text') is embedded with the shipped pretrained all-MiniLM-L6-v2 encoder
(mean-pooled, L2-normalised), k-means (k-means++ seeding, Lloyd's iterations) groups them, and every record is
written back with its cluster id in --field (default 'cluster'); a training recipe reads it with
``data.task_field: cluster`` and ``moe_lora.num_tasks: k``. The centroids go to <out>.centroids.safetensors for
assigning unseen instructions (moe_lora.clusters.assign). Both files are written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_lora.commands.argcheck import at_least, need_file, raise_problems

HELP = "cluster a data set's instructions with k-means (MoCLE's cluster ids)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSONL with a 'prompt' (or 'text') per record")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--out", required=True, help="JSONL to write: the records with their cluster id")
    parser.add_argument("--field", default="cluster", help="name of the cluster id field (default 'cluster')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means++ seeding")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per encoder forward")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json

    from safetensors.torch import save_file

    from moe_lora.atomic_dir import write_text_atomic
    from moe_lora.clusters import embed_texts, kmeans
    from moe_lora.jsonl import iter_json_objects

    problems: list[str] = []
    need_file(problems, "--data", args.data)
    at_least(problems, "--k", args.k, 1)
    at_least(problems, "--batch-size", args.batch_size, 1)
    raise_problems(problems)
    rows = [obj for _, obj in iter_json_objects(args.data, "--data")]
    texts = []
    for i, r in enumerate(rows):
        text = r.get("prompt", r.get("text"))
        if not isinstance(text, str):
            raise ValueError(f"--data: record {i + 1} of {args.data} has no string 'prompt' or 'text'")
        texts.append(text)
    if args.k > len(texts):
        raise ValueError(f"--k: {args.k} clusters for {len(texts)} records")
    X = embed_texts(texts, batch_size=args.batch_size, progress=not args.no_progress)
    centroids, labels = kmeans(X, args.k, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps({**r, args.field: int(c)}) + "\n" for r, c in zip(rows, labels)))
    cpath = out.with_name(out.name + ".centroids.safetensors")
    tmp = cpath.with_name("." + cpath.name + ".tmp")
    save_file({"centroids": centroids.contiguous()}, str(tmp), metadata={"k": str(args.k), "seed": str(args.seed)})
    tmp.replace(cpath)
    sizes = [int(n) for n in labels.bincount(minlength=args.k)]
    print(f"wrote {out} ({len(rows)} records, clusters of sizes {sizes}) and {cpath}")
    return 0
