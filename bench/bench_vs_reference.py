"""Our training step side by side with the JAX reference's (google-research/multinerf), same configs and scene.

    python bench/bench_vs_reference.py [--gin_configs bench/bench_demo.gin configs/demo.gin] [--gin_bindings ...]
        [--batch_size N] [--steps 10 --warmup 3 --repeats 3] [--threads N] [--malloc_tune] [--scene_dir DIR]
        [--reference_dir /path/to/multinerf --reference_python /path/to/jax/venv/bin/python] [--append]

Each --gin_configs entry is one row of the table (join the files of one row with '+', e.g. a.gin+b.gin);
relative paths are taken from the repository root, where the script runs.
A generated scene (`mipnerf360.synthetic.write_colmap_scene`: the mip-NeRF 360 layout, `images/`, `images_2/`,
`images_4/` and a COLMAP text model in `sparse/0/`, which both implementations' 'llff' loaders read) is written
once to --scene_dir (default: a temporary folder, removed at the end); Config.data_dir points both at it, and
--batch_size becomes the binding Config.batch_size = N for both.

Ours: `train_utils.train_step` of this checkout's mipnerf360 on CPU (or --device), the model built as `python -m
train` builds it, --num_batches batches drawn by `datasets.RaySampler` from the scene before timing and cycled;
the median wall time of --steps steps after --warmup untimed ones (`benchlib.time_train_steps`, as
bench_train.py times it). Reference: only with --reference_dir and --reference_python, the reference's pmapped
`train_step` from `train_utils.setup_model` on the same gin files and bindings, timed the same way by
bench/reference_train_step.py, run by --reference_python in a subprocess (it imports the reference's
`internal.*`; mipnerf360 never imports jax). The reference's gin includes (`include 'configs/360.gin'`) are
resolved in --reference_dir, whose configs/360.gin means the same as ours.

Threads: --threads N (default: all CPUs this process may use) for both. Ours: torch.set_num_threads(N), and the
process pinned to the first N of its CPUs while it runs. Reference: the same N CPUs by affinity, which is what
sizes jax 0.4.13's CPU thread pool, and XLA_FLAGS=--xla_cpu_multi_thread_eigen=false for N = 1
(XLA_FLAGS has no thread-count flag there; see reference_train_step.py).

Runs alternate per config, ours then the reference's, --repeats times, so that the load of a shared machine
falls on both alike. Prints one line per run, then a table: for each config the median over runs of each run's
median ms/step and CPU time per step (user + system, all threads), rays/s and the ratios reference / ours.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # Time this checkout's mipnerf360, not an installed one.
sys.path.insert(0, BENCH_DIR)
import benchlib  # noqa: E402
import reference_train_step  # noqa: E402  (stdlib only at import: jax is imported by its main)
import torch  # noqa: E402


class ReferenceSetupError(ValueError):
    """--reference_dir / --reference_python do not point at a usable reference."""


class ReferenceRunError(RuntimeError):
    """The reference's run failed; the message holds the end of its output."""


@dataclasses.dataclass
class Run:
    ms: float
    cpu_ms: float
    batch: int
    num_params: int
    loss: float
    info: Optional[Dict[str, object]] = None  # The reference's versions, backend, CPUs and XLA_FLAGS.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, gin_configs_default=['bench/bench_demo.gin', 'configs/demo.gin'],
                             gin_configs_help="one table row each; join several files of one row with '+'")
    p.add_argument('--batch_size', type=int, default=None, help='Config.batch_size for both')
    p.add_argument('--steps', type=int, default=10, help='timed steps per run')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (JAX compiles in the first)')
    p.add_argument('--num_batches', type=int, default=4, help='distinct batches cycled through')
    p.add_argument('--repeats', type=int, default=3, help='runs of each side per config, alternating')
    p.add_argument('--scene_dir', default=None,
                   help='where the scene is written (reused if it holds sparse/0); default a temporary folder')
    p.add_argument('--scene_views', type=int, default=24)
    p.add_argument('--scene_width', type=int, default=128, help='full-resolution width (images_2 is half)')
    p.add_argument('--scene_height', type=int, default=96)
    p.add_argument('--reference_dir', default=None, help='a google-research/multinerf checkout')
    p.add_argument('--reference_python', default=None, help='a Python with the reference\'s jax, flax, gin')
    return p.parse_args(argv)


def check_reference(reference_dir: Optional[str], reference_python: Optional[str]) -> bool:
    """Whether the reference is to be timed; raises ReferenceSetupError if the two flags are not usable."""
    if reference_dir is None and reference_python is None:
        return False
    if reference_dir is None or reference_python is None:
        raise ReferenceSetupError('Give both --reference_dir (a multinerf checkout) and --reference_python (a '
                                  'Python with its jax, flax and gin), or neither to time only ours.')
    if not os.path.isfile(os.path.join(reference_dir, 'internal', 'models.py')):
        raise ReferenceSetupError(f'--reference_dir {reference_dir} has no internal/models.py; point it at a '
                                  'checkout of https://github.com/google-research/multinerf.')
    if not (os.path.isfile(reference_python) and os.access(reference_python, os.X_OK)):
        raise ReferenceSetupError(f'--reference_python {reference_python} is not an executable file; give the '
                                  "python of the reference's environment (e.g. /path/to/venv/bin/python).")
    return True


def row_files(entry: str) -> List[str]:
    """The gin files of one row, absolute (relative paths are taken from the repository root)."""
    return [os.path.join(benchlib.REPO_ROOT, f) for f in entry.split('+')]


def row_bindings(args, data_dir: str) -> List[str]:
    bindings = list(args.gin_bindings) + [f'Config.data_dir = {data_dir!r}']
    if args.batch_size:
        bindings.append(f'Config.batch_size = {args.batch_size}')
    return bindings


@contextlib.contextmanager
def scene(args):
    """The scene's folder: --scene_dir (written unless it holds sparse/0) or a temporary one."""
    from mipnerf360 import synthetic
    with contextlib.ExitStack() as stack:
        data_dir = args.scene_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix='bench_vs_ref_'))
        if not os.path.isdir(os.path.join(data_dir, 'sparse', '0')):
            synthetic.write_colmap_scene(data_dir, n_views=args.scene_views, width=args.scene_width,
                                         height=args.scene_height, factors=(2, 4), seed=args.seed)
        yield os.path.abspath(data_dir)


@contextlib.contextmanager
def on_cpus(cpus: Sequence[int], threads: int):
    """Pins this process to `cpus` and torch to `threads` threads; restores both afterwards."""
    saved_cpus, saved_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved_cpus)
        torch.set_num_threads(saved_threads)


def time_ours(args, entry: str, data_dir: str) -> Run:
    from mipnerf360 import datasets, train_utils
    row_args = argparse.Namespace(**{**vars(args), 'gin_configs': row_files(entry),
                                     'gin_bindings': row_bindings(args, data_dir)})
    config, device, model = benchlib.setup_model(row_args, train=True)
    sampler = datasets.RaySampler(datasets.load_scene(config, 'train'), config, device)
    batches = [sampler.get_train_batch(i) for i in range(args.num_batches)]
    state = train_utils.create_train_state(config, model)
    cpu_times: List[float] = []
    times, losses = benchlib.time_train_steps(state, config, batches, device, args.warmup, args.steps, args.seed,
                                              cpu_times)
    return Run(ms=1e3 * benchlib.median(times), cpu_ms=1e3 * benchlib.median(cpu_times), batch=config.batch_size,
               num_params=sum(p.numel() for p in model.parameters()), loss=float(losses[-1]))


def time_reference(args, entry: str, data_dir: str) -> Run:
    cmd = [args.reference_python, reference_train_step.__file__, '--reference_dir', args.reference_dir,
           '--gin_configs', *row_files(entry), '--gin_bindings', *row_bindings(args, data_dir),
           '--steps', str(args.steps), '--warmup', str(args.warmup), '--num_batches', str(args.num_batches),
           '--threads', str(args.threads), '--seed', str(args.seed)]
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    prefix = reference_train_step.RESULT_PREFIX
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or not lines:
        tail = '\n'.join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ReferenceRunError(f'The reference run failed (exit {proc.returncode}): {" ".join(cmd)}\n{tail}')
    r = json.loads(lines[-1][len(prefix):])
    return Run(ms=r['ms'], cpu_ms=r['cpu_ms'], batch=r['batch'], num_params=r['num_params'], loss=r['loss'],
               info=r)


def summarise(runs: Sequence[Run]) -> Dict[str, float]:
    return {'ms': statistics.median(r.ms for r in runs), 'cpu_ms': statistics.median(r.cpu_ms for r in runs)}


def table(results: Dict[str, Dict[str, List[Run]]]) -> str:
    """A markdown table: per config the medians over runs (ms/step, CPU ms/step), rays/s, ratios reference / ours
    ('-' where the reference was not run)."""
    head = ['config', 'batch', 'params', 'ours ms/step', 'reference ms/step', 'ratio', 'ours CPU ms/step',
            'reference CPU ms/step', 'CPU ratio', 'ours rays/s', 'reference rays/s']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for entry, sides in results.items():
        ours, ref = sides['ours'], sides['reference']
        batch, o = ours[0].batch, summarise(ours)
        params = f'{ours[0].num_params:,}'
        r = summarise(ref) if ref else None
        if ref and ref[0].num_params != ours[0].num_params:
            params += f' (reference {ref[0].num_params:,})'
        fmt = lambda x, spec='.1f': '-' if r is None else format(x(), spec)
        cells = [entry, str(batch), params, f'{o["ms"]:.1f}', fmt(lambda: r['ms']),
                 fmt(lambda: r['ms'] / o['ms'], '.2f'), f'{o["cpu_ms"]:.1f}', fmt(lambda: r['cpu_ms']),
                 fmt(lambda: r['cpu_ms'] / o['cpu_ms'], '.2f'), f'{batch / o["ms"] * 1e3:.0f}',
                 fmt(lambda: batch / r['ms'] * 1e3, '.0f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> Dict[str, Dict[str, List[Run]]]:
    """Runs the comparison; returns {config entry: {'ours': [Run], 'reference': [Run]}} and prints the table."""
    args = parse_args(argv)
    with_reference = check_reference(args.reference_dir, args.reference_python)
    for name in ('scene_dir', 'json', 'reference_dir', 'reference_python'):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    cpus = sorted(os.sched_getaffinity(0))[:args.threads] if args.threads else sorted(os.sched_getaffinity(0))
    args.threads = len(cpus)
    results = {entry: {'ours': [], 'reference': []} for entry in args.gin_configs}
    # From the repository root, our gin files' `include 'configs/360.gin'` resolves (from elsewhere gin fails on
    # the repository's configs/ folder, importable as a namespace package once the root is on sys.path).
    with contextlib.chdir(benchlib.REPO_ROOT), scene(args) as data_dir:
        for repeat in range(args.repeats):
            for entry in args.gin_configs:
                with on_cpus(cpus, args.threads):
                    run = time_ours(args, entry, data_dir)
                results[entry]['ours'].append(run)
                print(f'run {repeat + 1} {entry} ours: {run.ms:.1f} ms/step (CPU {run.cpu_ms:.1f} ms), '
                      f'loss {run.loss:.6f}', flush=True)
                if with_reference:
                    run = time_reference(args, entry, data_dir)
                    results[entry]['reference'].append(run)
                    print(f'run {repeat + 1} {entry} reference: {run.ms:.1f} ms/step (CPU {run.cpu_ms:.1f} ms), '
                          f'loss {run.loss:.6f}', flush=True)
    info = next((runs['reference'][-1].info for runs in results.values() if runs['reference']), None)
    header = (f'ours: torch {torch.__version__}, {args.threads} threads, device {args.device}'
              + (f'; reference: jax {info["jax"]}, flax {info["flax"]}, backend {info["backend"]}, '
                 f'{info["cpus"]} CPUs, XLA_FLAGS={info["xla_flags"]!r}' if info else '')
              + f'; median over {args.repeats} runs of the median of {args.steps} steps after {args.warmup}; '
              'ratio = reference / ours')
    text = table(results)
    print(header + '\n' + text, flush=True)
    for entry, sides in results.items():
        benchlib.write_json(args, {'bench': 'vs_reference', 'config': entry,
                                   **{f'{side}_{k}': v for side, runs in sides.items() if runs
                                      for k, v in summarise(runs).items()}})
    if args.append:
        benchlib.append_result(f'train_step vs the JAX reference{" " + args.label if args.label else ""}',
                               torch.device(args.device), {'setting': header, 'table': '\n\n' + text + '\n'})
    return results


def cli(argv=None) -> int:
    """main() with a bad reference setup reported as one `error:` line on stderr (exit status 2)."""
    try:
        main(argv)
    except ReferenceSetupError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
