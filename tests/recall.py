"""numpy recounts of retrieval recall@K (CLIP_benchmark's definition: a query scores when one of its positives is in
its top K) from a score matrix, for checking the metrics mrl_clip reports."""
import numpy as np


def positives_of(text_image_index, n_images) -> np.ndarray:
    """[texts, images] bool: each text's own image."""
    positives = np.zeros((len(text_image_index), n_images), dtype=bool)
    positives[np.arange(len(text_image_index)), np.asarray(text_image_index)] = True
    return positives


def recall_by_rank(scores, positives, k, tie_order):
    """Recall@k: rank = items scoring more, plus (tie_order) items scoring the same that come first (lower
    index)."""
    hits = []
    for s, pos in zip(scores, positives):
        ranks = [(s > s[j]).sum() + (tie_order and (s[:j] == s[j]).sum()) for j in np.flatnonzero(pos)]
        hits.append(min(ranks) < k)
    return float(np.mean(hits))


def undecided(scores, positives, k, tolerance):
    """Queries whose hit or miss float rounding may decide: a positive within 2 * tolerance of the k-th score."""
    kth = -np.sort(-scores, axis=1)[:, k - 1]
    best = np.where(positives, scores, -np.inf).max(axis=1)
    return np.abs(best - np.asarray(kth)) <= 2 * np.asarray(tolerance)


def encoded_pairs(model_name, folder) -> tuple:
    """(image features, text features, text -> image index) as numpy, encoded as `eval retrieval` encodes them
    (its model loader, its CLIP_benchmark reader, its batches): the features a recount starts from."""
    from mrl_clip import models
    from mrl_clip.eval.zeroshot_retrieval import encode_pairs, load_retrieval_folder

    model, _, preprocess, tokenizer = models.create(model_name, None)
    return tuple(t.numpy() for t in encode_pairs(model.eval(), tokenizer, load_retrieval_folder(str(folder),
                                                                                                preprocess)))
