"""Thin Prefect wrappers, one module per stage; ``STAGE_TASKS`` maps stage name → task."""

from tasks.answers import answers_task
from tasks.augment_select import augment_select_task
from tasks.embed import embed_task
from tasks.evaluate import EVALUATE_TASKS
from tasks.export import export_task
from tasks.final_train import final_train_task
from tasks.high_quality import high_quality_task
from tasks.ingest import ingest_task
from tasks.necessity import necessity_task
from tasks.quality import quality_task
from tasks.sample import sample_task
from tasks.seed_select import seed_select_task
from tasks.seed_train import seed_train_task

STAGE_TASKS = {
    "ingest": ingest_task,
    "sample": sample_task,
    "quality": quality_task,
    "high_quality": high_quality_task,
    "embed": embed_task,
    "seed_select": seed_select_task,
    "seed_train": seed_train_task,
    "answers": answers_task,
    "necessity": necessity_task,
    "augment_select": augment_select_task,
    "final_train": final_train_task,
    "export": export_task,
}
STAGE_TASKS.update(EVALUATE_TASKS)  # the evaluation flow's stages (flows/evaluate.py)
