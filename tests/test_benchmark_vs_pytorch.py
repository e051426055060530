"""benchmarks/vs_pytorch.py: alternates a (stand-in) PyTorch --bench and cm_jax's train-step benchmark and
summarises them; the stand-in prints what the real reference prints, so no PyTorch is needed."""

import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'vs_pytorch.py')

FAKE_REFERENCE = textwrap.dedent('''
    import json, sys
    assert sys.argv[1:] == ['--bench'], sys.argv
    print('params 2734945')
    a = {"model": "diffusers UNet2DModel EDM", "batch": 128, "threads": 2, "flops_per_step": 2.0e11,
         "step_s": 2.0, "flops_per_s": 1.0e11, "images_per_s": 64.0}
    b = dict(a, model="GroupNorm/SiLU conv net, width 64, CT step", flops_per_s=2.0e11, step_s=1.0)
    for r in (a, b, dict(b, model="fastest: " + b["model"])):
        print(json.dumps(r))
''')


def run(tmp_path, *args):
  reference = tmp_path / 'reference.py'
  reference.write_text(FAKE_REFERENCE)
  return subprocess.run([sys.executable, SCRIPT, f'--torch_python={sys.executable}', f'--reference={reference}',
                         *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


def test_side_by_side_records_and_summary(tmp_path):
  out = run(tmp_path, '--rounds=1', '--steps=1',
            '--configs=configs/test.py;configs/test.py|--config.model.ch_mult=(1,2)|--config.training.batch_size=4')
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()]
  sides = [r.get('side') for r in records[:-1]]
  assert sides == ['pytorch'] * 3 + ['cm_jax'] * 2
  jax_records = records[3:5]
  assert jax_records[1]['overrides'] == ['--config.model.ch_mult=(1,2)', '--config.training.batch_size=4']
  assert jax_records[1]['batch_size'] == 4 and jax_records[0]['batch_size'] != 4
  summary = records[-1]
  assert summary['summary'] is True and summary['pytorch_flops_per_s'] == 2.0e11
  assert summary['pytorch_model'].startswith('fastest: GroupNorm/SiLU')
  assert [c['config'] for c in summary['cm_jax']] == [
      'configs/test.py', 'configs/test.py|--config.model.ch_mult=(1,2)|--config.training.batch_size=4']
  for entry, record in zip(summary['cm_jax'], jax_records):
    assert entry['flops_per_s'] == record['flops_per_s'] > 0
    assert entry['ratio_to_pytorch'] == round(record['flops_per_s'] / 2.0e11, 3)


def test_a_missing_torch_python_is_one_error_line(tmp_path):
  out = subprocess.run([sys.executable, SCRIPT, '--torch_python=/nonexistent/python'], capture_output=True,
                       text=True, timeout=120, cwd=REPO_ROOT)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      'vs_pytorch.py: error: --torch_python /nonexistent/python does not exist.')


FAKE_SAME_NETWORK = textwrap.dedent('''
    import json, sys
    print(json.dumps({"model": "cm_jax UNet in PyTorch", "argv": sys.argv[1:], "batch": 4, "flops_per_step": 1e9,
                      "step_s": 0.5, "flops_per_s": 2.0e9, "images_per_s": 8.0}))
''')


def test_same_network_rebuilds_each_configs_network_and_batch_in_pytorch(tmp_path):
  script = tmp_path / 'same.py'
  script.write_text(FAKE_SAME_NETWORK)
  out = run(tmp_path, '--rounds=1', '--steps=1', '--same_network', f'--same_network_script={script}',
            '--configs=configs/test.py|--config.model.attn_resolutions=(4,)|--config.training.batch_size=4')
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r.get('side') for r in records[:-1]] == ['pytorch'] * 3 + ['cm_jax', 'pytorch_same_network']
  jax_record, same = records[3], records[4]
  model = jax_record['model']
  assert same['argv'] == [f'--ch={model["ch"]}', '--ch_mult=' + ','.join(map(str, model['ch_mult'])),
                          f'--num_res_blocks={model["num_res_blocks"]}', '--attn=4',
                          f'--groups={model["num_groups"]}', '--size=28', '--bs=4']
  entry = records[-1]['cm_jax'][0]
  assert entry['same_network_flops_per_s'] == 2.0e9 and entry['same_network_images_per_s'] == 8.0
  assert entry['ratio_to_same_network'] == round(jax_record['flops_per_s'] / 2.0e9, 3)


def test_same_network_refuses_a_network_it_does_not_rebuild_in_one_line(tmp_path):
  script = tmp_path / 'same.py'
  script.write_text(FAKE_SAME_NETWORK)
  out = run(tmp_path, '--rounds=1', '--steps=1', '--same_network', f'--same_network_script={script}',
            '--configs=configs/test.py|--config.model.patch_size=2')
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      'vs_pytorch.py: error: configs/test.py|--config.model.patch_size=2: --same_network rebuilds only the plain '
      'UNet: config.model.patch_size = 2 (it needs 1).')
