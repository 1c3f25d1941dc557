"""`python -m bench.prepare --data_dir=D`: TFDS mnist from the vendored files, once per cache."""

from absl import app
from absl import flags

flags.DEFINE_string("data_dir", "bench/.cache/tfds", "TFDS directory to prepare.")


def main(argv):
  del argv
  from trainer import data  # TensorFlow loads only once the flags parsed.
  data.prepare("mnist", flags.FLAGS.data_dir)


if __name__ == "__main__":
  app.run(main)
