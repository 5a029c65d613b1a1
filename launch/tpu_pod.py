"""The main entry: one RL run, from a config file plus `--config.x.y=value` overrides.

    python launch/tpu_pod.py                                  # configs/demo.py, CPU, ~minutes
    python launch/tpu_pod.py --config=configs/stage2.py --config.model.hf_dir=... \
        --config.data.train_file=... --config.retriever.index_dir=...
    python launch/tpu_pod.py --config=configs/stage2.py --config.rl.estimator=grpo  # ablation

On a multi-host TPU pod run the same command with --distributed on every host
(`gcloud compute tpus tpu-vm ssh ... --worker=all --command=...`): jax.distributed finds
the other hosts from the TPU environment; elsewhere give --coordinator_address,
--num_processes and --process_id. Paths may be gs://. A run resumes from its workdir's
latest checkpoint.
"""
import logging

import cli  # the --config flag; puts the repository root on sys.path
from absl import app, flags

flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize()")
flags.DEFINE_string("coordinator_address", None, "multi-host off TPU: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host off TPU: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host off TPU: this process's index")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # pylint: disable=import-outside-toplevel
    if flags.FLAGS.distributed:
        if jax.config.jax_platforms == "cpu":  # CPU processes exchange arrays through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                                   num_processes=flags.FLAGS.num_processes,
                                   process_id=flags.FLAGS.process_id)
    from searcher_jax import trainer  # pylint: disable=import-outside-toplevel
    logging.getLogger().setLevel(logging.INFO)
    logging.info("devices: %s", jax.devices())
    result = trainer.train(flags.FLAGS.config)
    logging.info("done: eval %s", result["eval"])


if __name__ == "__main__":
    cli.run(main)
