"""Small sizes of the air-quality recipe for tests (seconds, not minutes)."""

#: ``configs/airquality_grpo.yaml`` overrides: a tiny forecaster, one short stage 1, short horizons
SMALL = [
    "task.sft.epochs=1",
    "task.sft.max_windows=256",
    "task.sft.batch_size=64",
    "task.hidden=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.curriculum.steps_per_epoch=1",
    "task.curriculum.base=2",
    "task.curriculum.max=4",
    "task.eval_horizon=6",
    "task.eval_stride=96",
    "trainer.eval_every=0",
    "task.plot_starts=2",
]
