"""The released Qwen2.5-7B recipe (SPEC sections 2-4): every part's static configuration.

Stage configs and the demo start from this and change what differs. Each
section mirrors one part's frozen dataclass (see searcher_jax/run_config.py);
paths (model.hf_dir, data.*_file, retriever.index_dir) are the user's to give.
"""
import ml_collections
from ml_collections import config_dict

from searcher_jax import run_config
from searcher_jax.data.config import DataConfig
from searcher_jax.retrieval.retriever import RetrieverConfig
from searcher_jax.rl.collapse import CollapseConfig
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.rewards import RewardConfig
from searcher_jax.rollout import RolloutConfig
from searcher_jax.sampling.sampler import SamplerConfig
from searcher_jax.sampling.select import SelectConfig
from searcher_jax.trainer import TrainConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # init_from: a run's workdir whose latest params start this run (stage 2 from stage 1);
    # hf_dir still gives the architecture and the tokenizer.
    config.model = dict(hf_dir="", init_from="", dtype="bfloat16", scan_layers=True, remat=True,
                        attention="auto", attention_block=512)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Temperature 1.0, top-p 0.95, 512 tokens a segment; the buffer holds a 1,024-token
    # prompt, 9 segments and 8 document blocks (about 8.5k tokens).
    # batch_invariant=True makes a row's log-probs independent of the rows decoded beside it,
    # so the continuous schedule's log-probs (and a rerun's) are the barrier's bit for bit; it
    # costs speed (README, benchmarks: rollout schedules), so it is off: without it they agree
    # to about 1e-5 and the tokens agreed in every measured rollout.
    config.sampler = {**run_config.defaults(SamplerConfig), **run_config.defaults(SelectConfig),
                      "max_len": 8704, "segment_len": 512, "temperature": 1.0, "top_p": 0.95}
    config.retriever = run_config.defaults(RetrieverConfig)
    # 8 retrievals and top-3 in training; 9 and top-5 in evaluation (greedy). Continuous
    # rollout: rows search and resume on their own and free slots take new prompts; faster
    # than barrier rounds in every case measured (README, benchmarks: rollout schedules).
    config.rollout = {**run_config.defaults(RolloutConfig), "max_retrievals": 8, "top_k": 3,
                      "schedule": "continuous"}
    config.eval_rollout = {"max_retrievals": 9, "top_k": 5, "schedule": "continuous"}
    # total_steps 0: the cosine schedule spans the run's optimizer steps.
    config.rl = {**run_config.defaults(RLConfig), "estimator": "reinforce_baseline",
                 "kl_coef": 0.0, "samples_per_prompt": 16, "mini_batch_size": 256,
                 "total_steps": 0,
                 # Length-aware micro-batches: on rows of 64 to 1,024 tokens, 8 widths made
                 # the update 1.83x faster, 4 widths 1.51x (README, benchmarks), for one
                 # compiled branch of the step per width.
                 "length_buckets": 8}
    config.reward = {**run_config.defaults(RewardConfig), "recipe": "answer",
                     "answer_metric": "f1", "format_penalty": -2.0}
    config.data = {**run_config.defaults(DataConfig), "prompt_style": "base",
                   "max_prompt_len": 1024}
    # 64 prompts x 16 samples = 1,024 rollouts a step, 4 optimizer steps of 256.
    config.train = {**run_config.defaults(TrainConfig), "prompts_per_step": 64}
    # Collapse detection (searcher_jax/rl/collapse.py): warn, or with action="stop" stop, when
    # entropy, the likelihood of rewarded responses, length or format go past their bounds.
    config.collapse = run_config.defaults(CollapseConfig)
    # dir set: build the embedded synthetic world there and use it (configs/demo.py). seed
    # unset: the preset's; a placeholder, so `--config.world.seed=3` can still give an int.
    config.world = dict(dir="", preset="demo", seed=config_dict.placeholder(int))
    return ml_collections.ConfigDict(config)
