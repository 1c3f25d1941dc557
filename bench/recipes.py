"""`python -m bench.recipes --recipe='name=--flag ...'`: time-to-99% of trainer flag recipes.

For tuning the default recipe: each recipe runs once per seed with a test-set evaluation about
every 7,680 images, and one table row summarizes it (median time to 99%, seeds that reached it,
final accuracy, steady images/s). --mode=throughput runs a fixed number of steps instead.
"""

import json
import os
import shlex

from absl import app
from absl import flags

from bench import harness
from bench import report
from bench import stats

FLAGS = flags.FLAGS



def parse_recipe(text: str) -> tuple:
  """'name=--a=1 --b' -> ('name', ['--a=1', '--b'])."""
  name, _, args = text.partition("=")
  return name.strip(), shlex.split(args)


def eval_every(args: list) -> int:
  """bench.run's evaluation spacing (harness.EVAL_IMAGES) in this recipe's steps."""
  return harness.eval_every(int(harness.flag_value(args, "global_batch_size",
                                                  harness.DEFAULT_BATCH)))


def run_recipe(b: harness.Bench, name: str, args: list, seeds, mode: str, steps: int) -> dict:
  records = []
  for seed in seeds:
    extra = ([f"--eval_every_steps={eval_every(args)}"] if mode == "to99" else
             [f"--train_steps={steps}", "--checkpoint_every_steps=100000"])
    records.append(b.trainer(f"recipe_{name}_seed{seed}", [f"--seed={seed}", *extra, *args]))
  summaries = [r["summary"] for r in records]
  times = [s.get("time_to_99_s") for s in summaries]
  return {"name": name, "args": " ".join(args), "seeds": list(seeds),
          "time_to_99_median_s": stats.median_with_failures(times) if mode == "to99" else None,
          "reached": f"{sum(t is not None for t in times)}/{len(times)}",
          "time_to_99_s": times,
          "steps_to_99": [s.get("steps_to_99") for s in summaries],
          "final_accuracy": [s.get("final_accuracy") for s in summaries],
          "images_per_sec_median": stats.median_with_failures(
              [s.get("images_per_sec") for s in summaries]),
          "others_cpu_max": max(r["cpu"]["others_cpu"] for r in records)}


def _cells(values, digits=None) -> str:
  return " ".join(report.fmt(v) if digits is None else report.fmt(v, digits) for v in values)


def rows_table(rows: list) -> str:
  return report.table(
      ["recipe", "flags", "train s to 99% (median)", "reached", "steps to 99%", "final acc",
       "images/s", "other CPU"],
      [[r["name"], r["args"] or "(defaults)", report.fmt(r["time_to_99_median_s"], 1),
        r["reached"], _cells(r["steps_to_99"]), _cells(r["final_accuracy"], 4),
        report.fmt(r["images_per_sec_median"], 0), report.fmt(r["others_cpu_max"], 2)]
       for r in rows])



def _define_flags() -> None:
  """Flags exist only when this module is the entry point (importing it defines none)."""
  flags.DEFINE_multi_string("recipe", [], "name=trainer flags, e.g. 'e1=--epochs=1'.")
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds per recipe.")
  flags.DEFINE_enum("mode", "to99", ["to99", "throughput"], "Accuracy runs or fixed-step runs.")
  flags.DEFINE_integer("steps", 300, "Steps per run in throughput mode.")
  flags.DEFINE_string("cache_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                ".cache"), "Data and run directories.")
  flags.DEFINE_float("quiet_wait_s", 60.0, "Wait this long at most for an idle CPU before a run.")


def main(argv):
  del argv
  b = harness.Bench(False, FLAGS.cache_dir, [], FLAGS.quiet_wait_s)
  harness.prepare_data(b.data_dir)
  rows = []
  for text in FLAGS.recipe:
    name, args = parse_recipe(text)
    rows.append(run_recipe(b, name, args, [int(s) for s in FLAGS.seeds], FLAGS.mode,
                           FLAGS.steps))
    with open(os.path.join(FLAGS.cache_dir, "recipes.jsonl"), "a") as f:
      f.write(json.dumps(report.json_safe(rows[-1])) + "\n")
  print(rows_table(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
