"""Real multi-task data that ships inside common wheels: nothing is downloaded.

Three data sets, each read straight from the file its package installs (the packages themselves
are not imported, so scikit-learn's and river's import time is not paid):

- ``multi_digits``: scikit-learn's ``datasets/data/digits.csv.gz``, 1,797 handwritten digits of
  8×8 pixels (0-16), overlaid in pairs the way MultiMNIST overlays MNIST (Sabour et al., 2017;
  Sener & Koltun, 2018): one digit in the top-left corner of a 12×12 canvas, another in the
  bottom-right, the overlap keeping the brighter pixel. Tasks: the left digit, the right digit.
- ``yeast``: river's ``datasets/yeast.csv.gz`` (river ≥ 0.26), 2,417 genes × 103 expression and
  phylogenetic features, 14 binary functional classes (Elisseeff & Weston, 2001): 14 tasks.
- ``penguins``: palmerpenguins' ``data/penguins.csv``, 344 penguins (333 with every field):
  species (3 classes), sex (binary) and body mass in grams from the bill, flipper and island:
  tasks of different kinds on very different scales.

Each data set is split once, by a fixed seed, into train, validation and test (60/20/20), so every
method and seed sees the same split; the features are standardised with the training part's
statistics. The digits are split before they are paired: no digit image is in two parts.

Example:
    >>> data = load("penguins")  # needs palmerpenguins
    >>> data.train.inputs.shape, data.task_names
    (torch.Size([200, 6]), ('species', 'sex', 'body mass'))
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "MissingData",
    "MultiTaskData",
    "Split",
    "load",
    "package_file",
    "versions",
]

#: Each data set: the package whose wheel carries its file, and the file inside that package.
DATASETS: dict[str, tuple[str, str]] = {
    "multi_digits": ("sklearn", "datasets/data/digits.csv.gz"),
    "yeast": ("river", "datasets/yeast.csv.gz"),
    "penguins": ("palmerpenguins", "data/penguins.csv"),
}
#: The PyPI name of each package (what ``pip install`` takes).
DISTRIBUTIONS = {
    "sklearn": "scikit-learn",
    "river": "river>=0.26",
    "palmerpenguins": "palmerpenguins",
}
SPLIT_SEED = 0  # the one split every method and seed shares
TRAIN_SHARE, VALIDATION_SHARE = 0.6, 0.2  # the rest is the test part
#: How many pairs each digit image leads (as the left digit), with partners drawn from its part.
DIGIT_PAIRS_PER_IMAGE = 3
DIGIT_SIZE, CANVAS_SIZE = 8, 12


class MissingData(ImportError):
    """The package that carries a data set is not installed (or does not carry it)."""


@dataclass(frozen=True)
class Split:
    """One part of a data set: the inputs and one target tensor per task, rows aligned."""

    inputs: Tensor
    targets: tuple[Tensor, ...]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.inputs.to(device), tuple(t.to(device) for t in self.targets))


@dataclass(frozen=True)
class MultiTaskData:
    """A data set split three ways, with its tasks' names."""

    name: str
    task_names: tuple[str, ...]
    train: Split
    validation: Split
    test: Split
    source: str  # the file it was read from

    def to(self, device: torch.device | str) -> MultiTaskData:
        return MultiTaskData(
            self.name,
            self.task_names,
            self.train.to(device),
            self.validation.to(device),
            self.test.to(device),
            self.source,
        )


def package_file(package: str, relative: str, dataset: str) -> Path:
    """The file ``relative`` inside the installed ``package``, found without importing it; a
    :class:`MissingData` naming the extra and the package when it is not there."""
    install = f'pip install "fused-mtl[data]" (or {DISTRIBUTIONS[package]})'
    if package == "river" and sys.version_info < (3, 11):
        install = (
            "river 0.26, the first to ship it, needs Python 3.11 or newer; on this Python leave "
            "the problem out (fused-mtl compare --problem multi_digits,penguins)"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(
            f"the {dataset!r} data ships with {DISTRIBUTIONS[package]}, which is not installed: "
            f"{install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingData(
            f"the {dataset!r} data is read from {package}/{relative}, which this {package} "
            f"does not ship: {install}"
        )
    return path


def versions() -> dict[str, str | None]:
    """The installed version of each data set's package (None when it is absent)."""
    found: dict[str, str | None] = {}
    for package in dict.fromkeys(package for package, _ in DATASETS.values()):
        distribution = DISTRIBUTIONS[package].split(">")[0]
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution] = None
    return found


def load(name: str) -> MultiTaskData:
    """The data set ``name`` (a key of :data:`DATASETS`), split and standardised."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    path = package_file(*DATASETS[name], dataset=name)
    loader = {"multi_digits": _multi_digits, "yeast": _yeast, "penguins": _penguins}[name]
    return loader(path)


def _read_csv(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.reader(handle))


def _split_rows(count: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed random split of ``count`` rows into train, validation and test indices."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_end = round(TRAIN_SHARE * count)
    validation_end = train_end + round(VALIDATION_SHARE * count)
    return order[:train_end], order[train_end:validation_end], order[validation_end:]


def _standardised(features: Tensor, parts: Sequence[Tensor]) -> list[Tensor]:
    """Each part of ``features`` scaled by the training part's (the first's) mean and deviation;
    a constant column is left centred, not divided by zero."""
    train = features[parts[0]]
    mean, deviation = train.mean(0), train.std(0)
    deviation = torch.where(deviation > 0, deviation, torch.ones_like(deviation))
    return [(features[rows] - mean) / deviation for rows in parts]


def _multi_digits(path: Path) -> MultiTaskData:
    table = torch.tensor([[float(v) for v in row] for row in _read_csv(path)])  # no header
    images = table[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE) / 16.0
    labels = table[:, -1].long()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    splits = []
    for rows_of_part in _split_rows(len(labels)):
        left = rows_of_part.repeat(DIGIT_PAIRS_PER_IMAGE)
        # A partner other than the image itself: a shift of 1 to n-1 places within the part.
        shift = torch.randint(1, len(rows_of_part), (len(left),), generator=generator)
        position = torch.arange(len(left)) % len(rows_of_part)
        right = rows_of_part[(position + shift) % len(rows_of_part)]
        canvas = torch.zeros(len(left), 1, CANVAS_SIZE, CANVAS_SIZE)
        offset = CANVAS_SIZE - DIGIT_SIZE
        canvas[:, 0, :DIGIT_SIZE, :DIGIT_SIZE] = images[left]
        corner = canvas[:, 0, offset:, offset:]
        canvas[:, 0, offset:, offset:] = torch.maximum(corner, images[right])
        splits.append(Split(canvas, (labels[left], labels[right])))
    return MultiTaskData("multi_digits", ("left digit", "right digit"), *splits, str(path))


def _yeast(path: Path) -> MultiTaskData:
    header, *rows = _read_csv(path)
    labels = [i for i, column in enumerate(header) if column.startswith("Class")]
    features = [i for i, column in enumerate(header) if column.startswith("Att")]
    table = torch.tensor([[float(v) for v in row] for row in rows])
    parts = _split_rows(len(rows))
    inputs = _standardised(table[:, features], parts)
    splits = [
        Split(part_inputs, tuple(table[rows_of_part, column] for column in labels))
        for part_inputs, rows_of_part in zip(inputs, parts, strict=True)
    ]
    names = tuple(f"class {header[column].removeprefix('Class')}" for column in labels)
    return MultiTaskData("yeast", names, *splits, str(path))


PENGUIN_SPECIES = ("Adelie", "Chinstrap", "Gentoo")
PENGUIN_ISLANDS = ("Biscoe", "Dream", "Torgersen")


def _penguins(path: Path) -> MultiTaskData:
    header, *rows = _read_csv(path)
    column = {name: i for i, name in enumerate(header)}
    measures = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
    wanted = (*measures, "species", "island", "sex", "body_mass_g")
    complete = [row for row in rows if all(row[column[name]] != "NA" for name in wanted)]
    measured = torch.tensor([[float(row[column[name]]) for name in measures] for row in complete])
    island = torch.tensor([PENGUIN_ISLANDS.index(row[column["island"]]) for row in complete])
    species = torch.tensor([PENGUIN_SPECIES.index(row[column["species"]]) for row in complete])
    sex = torch.tensor([float(row[column["sex"]] == "male") for row in complete])
    mass = torch.tensor([float(row[column["body_mass_g"]]) for row in complete])
    parts = _split_rows(len(complete))
    islands = torch.nn.functional.one_hot(island, len(PENGUIN_ISLANDS)).float()
    splits = [
        Split(
            torch.cat([part_measures, islands[rows_of_part]], dim=1),
            (species[rows_of_part], sex[rows_of_part], mass[rows_of_part]),
        )
        for part_measures, rows_of_part in zip(_standardised(measured, parts), parts, strict=True)
    ]
    return MultiTaskData("penguins", ("species", "sex", "body mass"), *splits, str(path))
