"""bench/bench_vs_reference.py without JAX: our side's timing on a tiny setting, what the reference's driver is
given (a stand-in 'python' records its arguments and prints a result line), the table's arithmetic, and the
one-line refusals of a bad reference setup."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import bench_vs_reference as bvr  # noqa: E402
import reference_train_step  # noqa: E402

DEMO_PARAMS = 113_989  # configs/demo.gin's model (PropMLP 2x64, NerfMLP 4x128, octahedron basis).
TINY = ['--gin_configs', 'configs/demo.gin', '--batch_size', '32', '--steps', '2', '--warmup', '1',
        '--num_batches', '2', '--scene_views', '8', '--scene_width', '32', '--scene_height', '24',
        '--threads', '1']


def fake_reference(tmp_path, result):
    """A reference checkout with internal/models.py and a 'python' that logs its argv and prints `result`."""
    ref_dir = tmp_path / 'multinerf'
    (ref_dir / 'internal').mkdir(parents=True)
    (ref_dir / 'internal' / 'models.py').write_text('')
    log = tmp_path / 'argv.jsonl'
    python = tmp_path / 'python'
    line = reference_train_step.RESULT_PREFIX + json.dumps(result)
    python.write_text(f'#!{sys.executable}\nimport json, sys\n'
                      f'open({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\nprint({line!r})\n')
    python.chmod(0o755)
    return str(ref_dir), str(python), log


def test_ours_and_stand_in_reference_alternate_on_the_same_settings(tmp_path, capsys, monkeypatch):
    result = {'ms': 90.0, 'min_ms': 80.0, 'cpu_ms': 70.0, 'first_step_s': 30.0, 'batch': 32,
              'num_params': DEMO_PARAMS, 'loss': 0.2, 'backend': 'cpu', 'jax': '0.4.13', 'flax': '0.6.11',
              'cpus': 1, 'xla_flags': '--xla_cpu_multi_thread_eigen=false'}
    ref_dir, python, log = fake_reference(tmp_path, result)
    monkeypatch.chdir(tmp_path)  # Runs from anywhere; a relative --scene_dir is taken from here.
    scene_dir = str(tmp_path / 'scene')
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    results = bvr.main(TINY + ['--repeats', '2', '--scene_dir', 'scene', '--reference_dir', ref_dir,
                               '--reference_python', python])
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == cpus  # Restored.
    assert os.getcwd() == str(tmp_path)

    ours, ref = results['configs/demo.gin']['ours'], results['configs/demo.gin']['reference']
    assert len(ours) == 2 and len(ref) == 2
    for run in ours:
        assert run.batch == 32 and run.num_params == DEMO_PARAMS
        assert 0 < run.ms < 60_000 and 0 < run.cpu_ms < 60_000
        assert math.isfinite(run.loss) and 0 < run.loss < 1
    assert ours[0].loss == ours[1].loss  # Same seed, batches and steps: the runs differ only in time.
    assert ref[0].ms == 90.0 and ref[0].cpu_ms == 70.0 and ref[0].info['xla_flags'] == result['xla_flags']

    # The driver got the same gin file, the scene, the batch size and the thread count.
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert len(calls) == 2 and calls[0] == calls[1]
    argv = calls[0]
    assert argv[0] == reference_train_step.__file__
    assert argv[argv.index('--reference_dir') + 1] == ref_dir
    gin_files = argv[argv.index('--gin_configs') + 1:argv.index('--gin_bindings')]
    assert gin_files == [os.path.join(bvr.benchlib.REPO_ROOT, 'configs/demo.gin')]
    bindings = argv[argv.index('--gin_bindings') + 1:argv.index('--steps')]
    assert bindings == [f"Config.data_dir = '{os.path.abspath(scene_dir)}'", 'Config.batch_size = 32']
    assert argv[argv.index('--threads') + 1] == '1' and argv[argv.index('--steps') + 1] == '2'
    assert argv[argv.index('--warmup') + 1] == '1' and argv[argv.index('--num_batches') + 1] == '2'
    assert os.path.isdir(os.path.join(scene_dir, 'sparse', '0'))

    out = capsys.readouterr().out.splitlines()
    order = [ln.split(' ')[3].rstrip(':') for ln in out if ln.startswith('run ')]
    assert order == ['ours', 'reference', 'ours', 'reference']
    row = next(ln for ln in out if ln.startswith('| configs/demo.gin'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    o_ms = sorted(r.ms for r in ours)
    assert cells[:5] == ['configs/demo.gin', '32', f'{DEMO_PARAMS:,}', f'{sum(o_ms) / 2:.1f}', '90.0']
    assert cells[5] == f'{90.0 / (sum(o_ms) / 2):.2f}'
    assert cells[-1] == f'{32 / 90.0 * 1e3:.0f}'
    assert any("XLA_FLAGS='--xla_cpu_multi_thread_eigen=false'" in ln for ln in out)


def test_table_medians_over_runs_and_ratios():
    run = lambda ms, cpu, params=5: bvr.Run(ms=ms, cpu_ms=cpu, batch=1000, num_params=params, loss=0.1)
    text = bvr.table({'a.gin': {'ours': [run(100, 200), run(120, 220), run(90, 180)],
                                'reference': [run(400, 500), run(250, 800), run(300, 550)]},
                      'b.gin+c.gin': {'ours': [run(50, 60)], 'reference': [run(75, 90, params=6)]},
                      'd.gin': {'ours': [run(10, 20)], 'reference': []}})
    rows = [[c.strip() for c in ln.strip('|').split('|')] for ln in text.splitlines()[2:]]
    assert rows[0] == ['a.gin', '1000', '5', '100.0', '300.0', '3.00', '200.0', '550.0', '2.75', '10000', '3333']
    assert rows[1] == ['b.gin+c.gin', '1000', '5 (reference 6)', '50.0', '75.0', '1.50', '60.0', '90.0', '1.50',
                       '20000', '13333']
    assert rows[2] == ['d.gin', '1000', '5', '10.0', '-', '-', '20.0', '-', '-', '100000', '-']


def test_bad_reference_setups_are_refused_with_one_line(tmp_path, capsys):
    scene_dir = tmp_path / 'scene'
    empty = tmp_path / 'not_multinerf'
    empty.mkdir()
    cases = [
        (['--reference_dir', str(empty), '--reference_python', sys.executable],
         f'error: --reference_dir {empty} has no internal/models.py; point it at a checkout of '
         'https://github.com/google-research/multinerf.'),
        (['--reference_dir', str(empty)], 'error: Give both --reference_dir'),
    ]
    ref_dir, _, _ = fake_reference(tmp_path, {})
    cases.append((['--reference_dir', ref_dir, '--reference_python', str(tmp_path / 'missing' / 'python')],
                  f'error: --reference_python {tmp_path / "missing" / "python"} is not an executable file'))
    for flags, message in cases:
        assert bvr.cli(TINY + ['--scene_dir', str(scene_dir)] + flags) == 2
        captured = capsys.readouterr()
        assert captured.out == ''
        assert captured.err.count('\n') == 1 and captured.err.startswith(message), captured.err
    assert not scene_dir.exists()  # Refused before anything was written or timed.


def test_failed_reference_run_shows_its_output(tmp_path):
    ref_dir, _, _ = fake_reference(tmp_path, {})
    python = tmp_path / 'failing_python'
    python.write_text('#!/bin/sh\necho "ModuleNotFoundError: No module named jax" >&2\nexit 1\n')
    python.chmod(0o755)
    args = bvr.parse_args(TINY + ['--reference_dir', ref_dir, '--reference_python', str(python)])
    with pytest.raises(bvr.ReferenceRunError, match=r'exit 1\)[\s\S]*No module named jax'):
        bvr.time_reference(args, 'configs/demo.gin', str(tmp_path))
