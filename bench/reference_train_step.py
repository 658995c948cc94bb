"""Times the JAX reference's (google-research/multinerf) jitted training step; run by bench_vs_reference.py.

    /path/to/jax/python bench/reference_train_step.py --reference_dir /path/to/multinerf \
        --gin_configs A.gin [B.gin ...] [--gin_bindings ...] [--steps 10 --warmup 3 --num_batches 4] [--threads N]

Runs under the reference's Python and imports only the reference's modules (`internal.*` from --reference_dir)
and its dependencies (jax, flax, gin), never mipnerf360 or torch. As the reference's train.py does: the
dataset `internal.datasets.load_dataset('train', Config.data_dir, config)`, the model, state and pmapped step
from `train_utils.setup_model`, batches put on the device by `flax.jax_utils.prefetch_to_device`, train_frac =
(step - 1) / (max_steps - 1), loss threshold 1.0, the garbage collector off. --num_batches batches are drawn before
timing and cycled, so data loading is not timed. The first --warmup steps (the first one compiles) are untimed;
each timed step ends with `jax.block_until_ready` on the new state and stats.

Threads: jax 0.4.13's CPU client sizes its thread pool from the CPU affinity of the process, and the
XLA_FLAGS entry `intra_op_parallelism_threads=N` is not an XLA flag there (alone it aborts with "Unknown flags
in XLA_FLAGS"; after another flag it is ignored). So --threads N pins this process to N CPUs before jax is
imported, and for N = 1 also adds `--xla_cpu_multi_thread_eigen=false` (Eigen's matrix products on the calling
thread).

Prints the figures as one JSON line starting with RESULT_PREFIX on stdout.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

RESULT_PREFIX = 'REFERENCE_RESULT '


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reference_dir', required=True, help='a multinerf checkout (holds internal/models.py)')
    p.add_argument('--gin_configs', nargs='+', required=True,
                   help="gin files; includes are resolved from --reference_dir (its configs/)")
    p.add_argument('--gin_bindings', nargs='*', default=[])
    p.add_argument('--steps', type=int, default=10, help='timed steps')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (the first one compiles)')
    p.add_argument('--num_batches', type=int, default=4, help='distinct batches cycled through')
    p.add_argument('--threads', type=int, default=None, help='CPUs this process may run on (default: all)')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def limit_threads(threads):
    """Pins the process to `threads` CPUs and sets XLA_FLAGS; must run before jax is imported."""
    if not threads:
        return
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    if threads == 1:
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false').strip()


def main(argv=None):
    args = parse_args(argv)
    limit_threads(args.threads)
    reference_dir = os.path.abspath(args.reference_dir)
    gin_configs = [os.path.abspath(f) for f in args.gin_configs]
    sys.path[:0] = [reference_dir, os.path.join(reference_dir, 'internal', 'pycolmap')]
    os.chdir(reference_dir)  # gin resolves `include 'configs/360.gin'` from here.

    import flax
    import gin
    import jax
    import jax.numpy as jnp
    import numpy as np
    from internal import configs, datasets, models, train_utils  # noqa: F401 (models registers gin names)

    gin.parse_config_files_and_bindings(gin_configs, args.gin_bindings, skip_unknown=False)
    config = configs.Config()
    np.random.seed(20201473 + args.seed)  # The dataset draws batches with numpy's global generator.
    dataset = datasets.load_dataset('train', config.data_dir, config)
    host_batches = [next(dataset) for _ in range(args.num_batches)]
    batches = [next(flax.jax_utils.prefetch_to_device(iter([b]), 1)) for b in host_batches]
    cameras = tuple(jnp.array(x) if isinstance(x, np.ndarray) else x for x in dataset.cameras)

    _, state, _, train_pstep, _ = train_utils.setup_model(config, jax.random.PRNGKey(args.seed), dataset=dataset)
    num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    state = flax.jax_utils.replicate(state)
    rngs = jax.random.split(jax.random.PRNGKey(args.seed + 1), jax.local_device_count())

    times, cpu_times, losses = [], [], []
    gc.disable()
    first_step_s = None
    for i in range(args.warmup + args.steps):
        train_frac = jnp.clip(i / max(config.max_steps - 1, 1), 0, 1)
        c0, t0 = time.process_time(), time.perf_counter()
        state, stats, rngs = train_pstep(rngs, state, batches[i % len(batches)], cameras, train_frac, 1.0)
        jax.block_until_ready((state, stats))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i == 0:
            first_step_s = wall
        if i >= args.warmup:
            times.append(wall)
            cpu_times.append(cpu)
        losses.append(float(stats['loss'][0]))
    gc.enable()

    result = {'ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
              'cpu_ms': 1e3 * statistics.median(cpu_times), 'first_step_s': first_step_s,
              'batch': config.batch_size, 'num_params': num_params, 'loss': losses[-1],
              'backend': jax.default_backend(), 'jax': jax.__version__, 'flax': flax.__version__,
              'cpus': len(os.sched_getaffinity(0)), 'xla_flags': os.environ.get('XLA_FLAGS', '')}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
