"""Datasets: the MVTec AD layout, device-resident batching and a synthetic generator."""

from ebmad.data.io import DatasetError
from ebmad.data.mvtec import MVTecDataModule

__all__ = ["DatasetError", "MVTecDataModule"]
