"""Stage 2 of R1-Searcher: F1 answer reward on the 8,148 stage-2 questions.

    python launch/tpu_pod.py --config=configs/stage2.py \
        --config.model.hf_dir=gs://bucket/Qwen2.5-7B --config.data.train_file=.../stage_2.jsonl \
        --config.retriever.index_dir=gs://bucket/wiki_index --config.train.workdir=gs://bucket/run

`--config=configs/stage2.py:llama` is the released Llama-3.1-8B-Instruct stage 2, started
from stage 1's final checkpoint, which is also its reference policy:

    python launch/tpu_pod.py --config=configs/stage2.py:llama \
        --config.model.hf_dir=gs://bucket/Llama-3.1-8B-Instruct \
        --config.model.init_from=gs://bucket/stage1 ...   # stage 1's train.workdir

reinforce_baseline with KL 1e-4, F1 with a -1 format penalty, 65 prompts x 16 samples,
260 rows per optimizer step, saved every 20. Stage 1's HF export (`<workdir>/hf`) is for
serving and evaluation, not the hand-off (DESIGN.md point 8).
The default (`qwen`) is the released Qwen2.5-7B-Base recipe: one run from the base model,
F1 with a -2 penalty, KL 0, 64 x 16 samples, 256 rows per optimizer step.
"""
from configs import base

RECIPES = ("qwen", "llama")


def get_config(recipe: str = "qwen"):
    if recipe not in RECIPES:
        raise ValueError(f"configs/stage2.py: recipe must be one of {RECIPES}, got {recipe!r}")
    config = base.get_config()
    if recipe == "llama":
        config.data.prompt_style = "instruct"
        config.rl.update(estimator="reinforce_baseline", kl_coef=1e-4, mini_batch_size=260,
                         micro_batch_size=4)
        config.reward.update(format_penalty=-1.0, strict_format=False)
        config.train.update(prompts_per_step=65, save_every=20)
    return config
