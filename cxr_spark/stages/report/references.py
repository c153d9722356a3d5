"""Published figures for the same tasks, shown beside ours in the report and always marked as
references: they were measured by other people, on their splits, with their models.
"""
from __future__ import annotations

from cxr_spark.core.labels import LABELS

REFERENCE_MARK = "published reference, not our result"

#: Rajpurkar et al. 2017 (CheXNet), Table 2 of arXiv:1711.05225v3: per-finding AUROC on ChestX-ray14.
CHEXNET_AUROC: dict[str, float] = dict(zip(LABELS, (
    0.8094, 0.9248, 0.8638, 0.7345, 0.8676, 0.7802, 0.7680, 0.8887, 0.7901, 0.8878, 0.9371, 0.8047, 0.8062,
    0.9164,
)))
CHEXNET_CITATION = ("Rajpurkar P, Irvin J, Zhu K, et al. CheXNet: Radiologist-Level Pneumonia Detection on Chest "
                    "X-Rays with Deep Learning. arXiv:1711.05225 (2017), Table 2: AUROC per finding on ChestX-ray14, "
                    "DenseNet-121 at 224 px.")

#: The seed papers' binary (normal vs pneumonia) result on the Kaggle "Chest X-Ray Images (Pneumonia)" test split.
KAGGLE_PNEUMONIA = {"accuracy": 0.9116, "f1": 0.9322}
KAGGLE_CITATION = ("The project's seed papers: a CNN on the Kaggle Chest X-Ray Images (Pneumonia) dataset, binary "
                   "normal vs pneumonia, its test split: accuracy 91.16%, F1 93.22%.")
