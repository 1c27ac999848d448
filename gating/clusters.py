"""Domain clusters of the fine-tuning prompts (MoE² Sec. V-A, App. A, Fig. 6).

The prompts are embedded with the gating's own embedder (``gating.embed``), grouped by K-means
(scikit-learn, seeded) and described by what falls in each cluster: its size, the sources and
subjects it draws from, and the terms that set it apart (mean TF-IDF). One LoRA expert is then
fine-tuned per cluster. MMLU is never fine-tuning data: it trains and evaluates the gating.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.gating.data import McExample
from moe2.runtime.errors import ErrorCode, Moe2Error

DEFAULT_K = 8
TOP = 3  # sources, subjects and terms listed per cluster


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    index: int
    size: int
    sources: list[tuple[str, int]]  # the most common sources, with counts
    subjects: list[tuple[str, int]]
    terms: list[str]  # the terms with the highest mean TF-IDF in the cluster


@dataclass(frozen=True, slots=True)
class Clustering:
    """Each example's cluster, and the clusters' centres in embedding space."""

    k: int
    seed: int
    ids: list[str]
    labels: npt.NDArray[np.int64]  # (n,)
    centres: npt.NDArray[np.float32]  # (k, dim)

    def members(self, cluster: int) -> list[str]:
        return [i for i, label in zip(self.ids, self.labels, strict=True) if label == cluster]


def refuse_mmlu(examples: Sequence[McExample]) -> None:
    """MMLU trains and evaluates the gating; fine-tuning on it would leak into both."""
    mmlu = [ex.id for ex in examples if ex.source == "mmlu"]
    if mmlu:
        raise Moe2Error(
            ErrorCode.INVALID_FIELD,
            f"{len(mmlu)} MMLU examples (e.g. {mmlu[0]}) among the fine-tuning data: MMLU is "
            "for the gating and the evaluation only (MoE² Sec. V)",
        )


def cluster_examples(
    examples: Sequence[McExample], embeddings: npt.NDArray[np.float32], k: int, seed: int
) -> Clustering:
    """K-means over the prompts' embeddings (scikit-learn, ``n_init=10``, seeded)."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(examples):
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"k must be in 1..{len(examples)}, got {k}")
    model = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(embeddings)
    labels = np.asarray(model.labels_, dtype=np.int64)
    centres = np.asarray(model.cluster_centers_, dtype=np.float32)
    return Clustering(k, seed, [ex.id for ex in examples], labels, centres)


def describe(examples: Sequence[McExample], clustering: Clustering) -> list[ClusterSummary]:
    """Size, top sources, subjects and distinguishing terms of each cluster, largest first."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(stop_words="english", max_features=20_000, min_df=2)
    weights = tfidf.fit_transform([ex.question for ex in examples])
    vocabulary = np.asarray(tfidf.get_feature_names_out())
    summaries = []
    for cluster in range(clustering.k):
        rows = np.flatnonzero(clustering.labels == cluster)
        members = [examples[int(i)] for i in rows]
        mean = np.asarray(weights[rows].mean(axis=0)).ravel()
        summaries.append(
            ClusterSummary(
                index=cluster,
                size=len(rows),
                sources=Counter(ex.source for ex in members).most_common(TOP),
                subjects=Counter(ex.subject for ex in members).most_common(TOP),
                terms=[str(t) for t in vocabulary[np.argsort(-mean)[: TOP + 2]]],
            )
        )
    return sorted(summaries, key=lambda s: (-s.size, s.index))


def project_2d(embeddings: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.float64]:
    """A 2-D view of the embeddings for the plot (PCA: fast, and the same on every run)."""
    from sklearn.decomposition import PCA

    points: npt.NDArray[np.float64] = PCA(n_components=2, random_state=seed).fit_transform(
        embeddings.astype(np.float64)
    )
    return points


def plot_clusters(
    points: npt.NDArray[np.float64],
    clustering: Clustering,
    summaries: Sequence[ClusterSummary],
    path: Path,
) -> None:
    """The paper's Fig. 6 analogue: every prompt, coloured by its cluster, labelled by terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    cmap = plt.get_cmap("tab10" if clustering.k <= 10 else "tab20")
    by_index = {s.index: s for s in summaries}
    for cluster in range(clustering.k):
        mask = clustering.labels == cluster
        label = f"{cluster}: {', '.join(by_index[cluster].terms[:3])} ({int(mask.sum())})"
        x, y = points[mask, 0], points[mask, 1]
        ax.scatter(x, y, s=5, alpha=0.5, color=cmap(cluster % cmap.N), label=label)
    ax.set_title(f"Fine-tuning prompts, K-means (K = {clustering.k}), PCA of the embeddings")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=3, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def data_hash(paths: Sequence[Path]) -> str:
    """SHA-256 over the data files (sorted by path; a directory's files included), 16 hex."""
    files = sorted(
        f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def write_report(
    out: Path,
    clustering: Clustering,
    summaries: Sequence[ClusterSummary],
    meta: dict[str, Any],
) -> tuple[Path, Path]:
    """``clusters.json`` (every example's cluster, the summaries and how they were made) and
    ``clusters.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **meta,
        "k": clustering.k,
        "seed": clustering.seed,
        "clusters": [asdict(s) for s in summaries],
        "assignment": dict(zip(clustering.ids, clustering.labels.tolist(), strict=True)),
    }
    json_path = out / "clusters.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path = out / "clusters.md"
    md_path.write_text(report_table(summaries) + "\n")
    return json_path, md_path


def report_table(summaries: Sequence[ClusterSummary]) -> str:
    def counts(items: list[tuple[str, int]]) -> str:
        return ", ".join(f"{name} {n}" for name, n in items)

    lines = ["| cluster | size | sources | subjects | terms |", "|---:|---:|---|---|---|"]
    lines += [
        f"| {s.index} | {s.size} | {counts(s.sources)} | {counts(s.subjects)} | "
        f"{', '.join(s.terms)} |"
        for s in summaries
    ]
    return "\n".join(lines)
