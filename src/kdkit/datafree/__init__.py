"""Data-free distillation: teacher metadata records, input synthesis, generators.

* :mod:`~kdkit.datafree.records` — Lopes et al. 2017 metadata (top layer, all layers,
  dropout filters, spectral all layers, spectral layer pairs) and their objectives;
* :mod:`~kdkit.datafree.synthesis` — transfer sets and the batched input optimiser;
* :mod:`~kdkit.datafree.deepinversion` — DeepInversion / Adaptive DeepInversion;
* :mod:`~kdkit.datafree.dafl` — DAFL's generator and its sample loader.
* :mod:`~kdkit.datafree.common` — replacing a saved artifact safely; progress of long
  stages (a bar on a terminal, plain lines in a log).
"""

from kdkit.datafree.dafl import Generator, GeneratorLoader, dafl_generator, train_generator
from kdkit.datafree.deepinversion import DeepInversionObjective
from kdkit.datafree.records import (
    KINDS,
    MetadataRecord,
    RecordObjective,
    check_record_fits,
    compute_record,
    load_record,
    save_record,
    teacher_fingerprint,
)
from kdkit.datafree.synthesis import (
    TransferSet,
    load_transfer,
    noise_set,
    optimise_inputs,
    save_transfer,
)

__all__ = [
    "KINDS",
    "DeepInversionObjective",
    "Generator",
    "GeneratorLoader",
    "MetadataRecord",
    "RecordObjective",
    "TransferSet",
    "check_record_fits",
    "compute_record",
    "dafl_generator",
    "load_record",
    "load_transfer",
    "noise_set",
    "optimise_inputs",
    "save_record",
    "save_transfer",
    "teacher_fingerprint",
    "train_generator",
]
