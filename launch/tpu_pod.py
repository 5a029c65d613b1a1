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

It shows a progress bar and a line per evaluation on stdout, and logs warnings only;
--verbosity=0 logs at INFO (every step's metrics, checkpoints, compiles), --verbosity=1 DEBUG.
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
    cli.quiet_logging()
    import jax  # pylint: disable=import-outside-toplevel
    if flags.FLAGS.distributed:
        if jax.config.jax_platforms == "cpu":  # CPU processes exchange arrays through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                                   num_processes=flags.FLAGS.num_processes,
                                   process_id=flags.FLAGS.process_id)
    from searcher_jax import trainer, two_stage  # pylint: disable=import-outside-toplevel
    logging.info("devices: %s", jax.devices())
    config = flags.FLAGS.config
    if "stages" in config and config.stages.get("enabled", True):
        # configs/demo.py: both stages, then the policy comparison (two_stage.py)
        table = two_stage.run(config)
        print(f"done: {config.train.workdir}" + (" (results.md, training.png, policies.png)"
                                                 if table else ""))
        for name, groups in table.items():
            summary = groups["all"]
            print(f"  {name:<20} F1 {summary['f1']:.3f}  retrievals/question "
                  f"{summary['queries_per_question']:.2f}", flush=True)
        return
    result = trainer.train(config)
    shown = ", ".join(f"{k} {v:.3g}" for k, v in result["eval"].items())
    # Printed, not logged: the last thing a user sees, whatever the verbosity.
    print(f"done: {config.train.workdir}; eval {shown or 'not run'}", flush=True)


if __name__ == "__main__":
    cli.run(main)
