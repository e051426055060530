"""benchmarks/reader.py: one JSON line per thread count and one for JPEG draft mode; bad flags refused."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'reader.py')


def run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                        cwd=REPO_ROOT)


def test_reader_rates_and_draft_mode_on_a_synthetic_folder():
  out = run('--synthetic=6', '--width=120', '--height=90', '--num=6', '--batch=4', '--threads=1,2',
            '--image_size=16')
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r['what'] for r in records] == ['reader', 'reader', 'draft_mode']
  for r, threads in zip(records, (1, 2)):
    assert r['threads'] == threads and r['images'] == 6 and r['images_per_s'] > 0 and r['image_size'] == 16
    assert r['cpu'] and r['cpus'] >= 1
  draft = records[2]
  assert draft['images'] == 6 and draft['max_abs_diff'] >= 0 and draft['speedup'] > 0
  assert draft['within_one_level'] == (draft['max_abs_diff'] <= 1)


def test_bad_flags_are_one_error_line():
  for args, needle in ((['--synthetic=4', '--threads=0'], '--threads=0'), ([], '--manual_dir'),
                       (['--manual_dir=/nonexistent/folder'], '/nonexistent/folder')):
    out = run(*args)
    assert out.returncode == 2 and out.stdout == '', (args, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('reader.py: error: ') and needle in last, last
