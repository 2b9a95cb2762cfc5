"""The stage declarations, one file per phase of the method. Importing this package
registers every stage (mods/core/stage.py's registry); the pipeline's order is in
mods/pipeline.py.

    data.py       ingest, sample
    quality.py    quality, high_quality
    coverage.py   embed, seed_select
    training.py   seed_train, final_train
    necessity.py  answers, necessity, augment_select
    export.py     export
    evaluation.py the mods-evaluate flow's stages
"""

from mods.stages import coverage, data, evaluation, export, necessity, quality, training  # noqa: F401
