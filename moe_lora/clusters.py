"""Instruction clusters for MoCLE's cluster-conditioned routing (router 'cluster'), computed offline.

    X = embed_texts(instructions)              [N, H]  mean-pooled, L2-normalised sentence embeddings (the shipped
                                                       pretrained all-MiniLM-L6-v2 encoder: moe_lora.zoo "minilm")
    centroids, labels = kmeans(X, k, seed)             k-means++ seeding, then Lloyd's iterations until no point
                                                       changes cluster: every point is nearest its centroid and every
                                                       centroid is the mean of its points
    assign(X, centroids)                       [N]     nearest centroid (unseen instructions at inference)

``moe-lora cluster --data train.jsonl --k 8 --out train_clustered.jsonl`` writes each record with its cluster id
in a ``cluster`` field (the training recipe reads it with ``data.task_field: cluster``) and the centroids next to
it (``<out>.centroids.safetensors``) for assigning new instructions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def embed_texts(
    texts: Sequence[str],
    model_name: str = "minilm",
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """[N, H] fp32 L2-normalised mean-pooled last hidden states of ``texts`` (padding excluded)."""
    from .zoo import load_model, load_tokenizer

    model, tok = load_model(model_name).eval(), load_tokenizer(model_name)
    out = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch")
    with torch.no_grad():
        for i in starts:
            enc = tok(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def assign(X_NH: torch.Tensor, centroids_KH: torch.Tensor) -> torch.Tensor:
    """[N] int64 index of the nearest centroid (squared Euclidean distance; ties to the lower index)."""
    return torch.cdist(X_NH.double(), centroids_KH.double()).argmin(dim=1)


def kmeans(X_NH: torch.Tensor, k: int, seed: int = 0, max_iters: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, H] fp32, labels [N] int64): k-means++ seeding from ``seed``, then Lloyd's iterations until
    the assignment stops changing (or ``max_iters``). A cluster left empty takes the point farthest from its own
    centroid."""
    N = X_NH.shape[0]
    if not (isinstance(k, int) and 1 <= k <= N):
        raise ValueError(f"k: {k!r} must be an int in [1, number of texts = {N}]")
    X = X_NH.double()
    gen = torch.Generator().manual_seed(seed)
    centroids = [X[int(torch.randint(N, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(X, torch.stack(centroids)).min(dim=1).values.square()
        if float(d2.sum()) == 0:
            centroids.append(X[int(torch.randint(N, (1,), generator=gen))])
        else:
            centroids.append(X[int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))])
    C = torch.stack(centroids)
    labels = assign(X, C)
    for _ in range(max_iters):
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k).double()
        for j in torch.nonzero(counts == 0).flatten().tolist():  # an empty cluster takes the worst-fit point
            far = int((X - C[labels]).square().sum(1).argmax())
            labels[far] = j
            sums = torch.zeros_like(C).index_add_(0, labels, X)
            counts = torch.bincount(labels, minlength=k).double()
        C = sums / counts[:, None]
        new = assign(X, C)
        if torch.equal(new, labels):
            break
        labels = new
    return C.float(), labels
