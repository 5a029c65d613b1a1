"""Stage 1 of R1-Searcher: learn to search, on the 350 stage-1 questions.

    python launch/tpu_pod.py --config=configs/stage1.py --config.model.hf_dir=... \
        --config.data.train_file=.../stage_1.jsonl --config.retriever.index_dir=...

The default (`llama`) is the released Llama-3.1-8B-Instruct stage 1: grpo with KL 1e-4,
reward +1/-1 by cover EM plus 0.5 for a well-formed retrieval and 0.5 for the format,
15 prompts x 16 samples, 60 rows per optimizer step, saved every 10 steps; its workdir is
stage 2's model.init_from (configs/stage2.py). `--config=configs/stage1.py:paper` uses the
paper's stage-1 reward instead (0.5 retrieval + 0.5 format, no answer term).
"""
from configs import base

RECIPES = ("llama", "paper")


def get_config(recipe: str = "llama"):
    if recipe not in RECIPES:
        raise ValueError(f"configs/stage1.py: recipe must be one of {RECIPES}, got {recipe!r}")
    config = base.get_config()
    config.data.prompt_style = "instruct"
    config.rl.update(estimator="grpo", kl_coef=1e-4, mini_batch_size=60, micro_batch_size=4)
    config.reward.update(recipe="cem_retrieval_format" if recipe == "llama" else "retrieval_format",
                         strict_format=False)
    config.train.update(prompts_per_step=15, save_every=10)
    return config
