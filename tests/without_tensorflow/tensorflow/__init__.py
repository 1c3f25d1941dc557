"""On PYTHONPATH, makes `import tensorflow` fail: proves an error is reported before TF loads."""

raise ImportError("tensorflow was imported, but this error should have been reported before "
                  "TensorFlow loads (tests/without_tensorflow)")
