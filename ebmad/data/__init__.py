"""Datasets: layouts (MVTec AD, VisA, MVTec AD 2, your own folders), device-resident batching, a synthetic generator.

``AnomalyDataModule(layout=...)`` is the one datamodule; ``MVTecDataModule`` is it with the MVTec AD layout.
The OmegaConf resolver ``${ebmad_categories:<layout>}`` gives a layout's categories as a comma-separated
string (for sweeps).
"""

from omegaconf import OmegaConf

from ebmad.data.datamodule import AnomalyDataModule, false_alarm_summary
from ebmad.data.io import DatasetError
from ebmad.data.layout import LAYOUTS, DatasetIndex, TestItem, categories, get_layout
from ebmad.data.mvtec import MVTEC_CATEGORIES, MVTecDataModule


def _categories_csv(layout: str) -> str:
    names = categories(layout)
    if not names:
        raise ValueError(f"data.layout={layout} has no published categories to sweep; list yours")
    return ",".join(names)


OmegaConf.register_new_resolver("ebmad_categories", _categories_csv, replace=True)

__all__ = [
    "LAYOUTS", "MVTEC_CATEGORIES", "AnomalyDataModule", "DatasetError", "DatasetIndex", "MVTecDataModule",
    "TestItem", "categories", "false_alarm_summary", "get_layout",
]  # fmt: skip
