"""Data for attnfast's training pipeline: the seeds' Kaggle layouts, their preprocessing, synthetic sets.

``read_layout(kind, DIR)`` reads ``melanoma`` (marking.csv or SIIM-ISIC train.csv), ``cassava`` or
``folder`` data; ``build_datasets(info, Preprocessing(...))`` applies the seeds' subsampling, stratified
split and transforms; ``synthetic.ensure_synthetic`` writes the embedded default dataset. Bad data
raises :class:`AttnfastDataError` with one line naming the file and column.
"""
from .datasets import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Preprocessing, build_datasets, eval_transform,
                       load_image, stratified_split, subsample, train_transform)
from .errors import AttnfastDataError
from .layouts import DatasetInfo, Sample, list_images, listing_digest, parse_spec, read_layout, submission_id
from .synthetic import ensure_synthetic, write_dataset

__all__ = ["AttnfastDataError", "DatasetInfo", "Sample", "Preprocessing", "ImageDataset", "build_datasets",
           "read_layout", "parse_spec", "listing_digest",
           "list_images", "submission_id", "ensure_synthetic", "write_dataset",
           "subsample", "stratified_split", "train_transform", "eval_transform", "load_image", "IMAGENET_MEAN",
           "IMAGENET_STD"]
