"""`python -m bench.recipes --recipe='name=--flag ...' [--seeds=1,2,3]`: trainer flag recipes,
each timed as `make bench` times the default (fork to the first evaluation >= 99%, fork to exit,
images/s), one table row per recipe. For tuning the default recipe."""

import shlex

from absl import app
from absl import flags

from bench import report
from bench import run as bench_run

FLAGS = flags.FLAGS


def parse_recipe(text: str) -> tuple:
  """'name=--a=1 --b' -> ('name', ['--a=1', '--b'])."""
  name, _, args = text.partition("=")
  return name.strip(), shlex.split(args)


def row(name: str, args: list, records: list) -> list:
  summaries = [r.get("summary") or {} for r in records]
  to99 = [s.get("wall_to_99_s") for s in summaries]
  return [name, " ".join(args) or "(defaults)",
          report.fmt(report.median_with_failures(to99), 1),
          f"{sum(t is not None for t in to99)}/{len(to99)}",
          report.fmt(report.median_with_failures([r.get("wall_s") for r in records]), 1),
          " ".join(report.fmt(s.get("final_accuracy"), 4) for s in summaries),
          report.fmt(report.median_with_failures([s.get("images_per_sec") for s in summaries]), 0)]


HEADERS = ["recipe", "flags", "wall s to 99% (median)", "reached", "wall s (median)",
           "final accuracy", "images/s"]


def main(argv):
  del argv
  settings = bench_run.settings(False, [int(s) for s in FLAGS.seeds])
  b = bench_run.Bench(settings, FLAGS.cache_dir, FLAGS.quiet_wait_s)
  bench_run.jobs(settings)[0].run(b)  # prepare_mnist
  rows = []
  for text in FLAGS.recipe:
    name, args = parse_recipe(text)
    records = [b.trainer(f"recipe_{name}_seed{seed}", [f"--seed={seed}", *args])
               for seed in settings.seeds]
    rows.append(row(name, args, records))
    print(report.table(HEADERS, rows[-1:]), flush=True)
  print(report.table(HEADERS, rows))


if __name__ == "__main__":
  import os
  flags.DEFINE_multi_string("recipe", [], "name=trainer flags, e.g. 'e1=--epochs=1'.")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds per recipe.")
  flags.DEFINE_string("cache_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                ".cache"), "Data and run directories.")
  flags.DEFINE_float("quiet_wait_s", 20.0, "Wait this long at most for an idle CPU before a run.")
  app.run(main)
