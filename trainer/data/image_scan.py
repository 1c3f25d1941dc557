"""The layout of an image folder: one sub-folder of JPEG/PNG images per class (optionally inside
train/ and test/), read into labelled images, each in its split. Anything else is a DataError
naming the file or folder: a file is never skipped without a word."""

import dataclasses
import hashlib
import logging
import os

from trainer import errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def scan(root: str, eval_fraction: float) -> tuple:
  """(class names, [Image]) of the local folder root; DataError for anything that is not
  one sub-folder of images per class (a file is never skipped without a word).

  With train/ and test/ sub-folders, those are the splits; otherwise the test split is the
  images whose relative path hashes below eval_fraction, the same ones every run.
  """
  folders = _subfolders(root)
  if {"train", "test"} <= set(folders):
    extra = sorted(set(folders) - {"train", "test"})
    if extra:
      raise errors.DataError(
          f"{root} has train/ and test/ sub-folders and also {', '.join(extra)}: with train/ "
          "and test/, every class folder goes inside both; move or remove the others.")
    train = _class_images(os.path.join(root, "train"), "train/")
    test = _class_images(os.path.join(root, "test"), "test/")
    class_names = sorted(train)
    _check_classes(os.path.join(root, "train"), class_names)
    unknown = sorted(set(test) - set(train))
    if unknown:
      raise errors.DataError(
          f"{root}/test has class folder(s) {', '.join(unknown)} that {root}/train lacks: "
          "every test class needs training images; add them or remove those folders.")
    labels = {name: i for i, name in enumerate(class_names)}
    images = [Image(rel, labels[name], split)
              for split, by_class in (("train", train), ("test", test))
              for name, rels in sorted(by_class.items()) for rel in rels]
  else:
    by_class = _class_images(root, "")
    class_names = sorted(by_class)
    _check_classes(root, class_names)
    images = [Image(rel, i, split_of(rel, eval_fraction))
              for i, name in enumerate(class_names) for rel in by_class[name]]
  _check_splits(root, images, eval_fraction)
  return class_names, images


def split_of(rel: str, eval_fraction: float) -> str:
  """test for the fraction of paths whose hash falls below eval_fraction: independent of the
  listing order and of the other files, so adding images never moves existing ones."""
  digest = hashlib.sha256(rel.encode()).digest()
  return "test" if int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction else "train"


@dataclasses.dataclass(frozen=True)
class Image:
  """One image file of the folder."""

  rel: str  # path under DIR with "/" separators: CLASS/FILE or SPLIT/CLASS/FILE
  label: int
  split: str  # "train" or "test"


def _subfolders(directory: str) -> list:
  return sorted(n for n in os.listdir(directory)
                if not n.startswith(".") and os.path.isdir(os.path.join(directory, n)))


def _class_images(directory: str, rel_prefix: str) -> dict:
  """{class folder name: [relative paths of its images]}; DataError for an empty class folder,
  a nested folder, a non-image file, or an image outside any class folder."""
  by_class = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith("."):
      continue  # hidden (.DS_Store, .ipynb_checkpoints): not data
    if os.path.isdir(path):
      by_class[name] = _images_in(path, f"{rel_prefix}{name}/")
    elif name.lower().endswith(IMAGE_SUFFIXES):
      raise errors.DataError(
          f"Image {path} is not inside a class folder: move it into {directory}/CLASS_NAME/.")
    else:
      logging.warning("Ignoring %s: only the sub-folders of %s hold data.", path, directory)
  return by_class


def _images_in(folder: str, rel_prefix: str) -> list:
  rels = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith("."):
      continue  # hidden files (.DS_Store, editors' backups) are not data
    if os.path.isdir(path):
      raise errors.DataError(
          f"{path} is a folder inside the class folder {folder}: classes are one level deep; "
          "move its images up into the class folder or remove it.")
    if not name.lower().endswith(IMAGE_SUFFIXES):
      raise errors.DataError(
          f"{path} is not a JPEG or PNG file (.jpg, .jpeg, .png): convert it or remove it.")
    rels.append(rel_prefix + name)
  if not rels:
    raise errors.DataError(
        f"Class folder {folder} holds no images: add JPEG/PNG images to it or remove it.")
  return rels


def _check_classes(directory: str, class_names: list) -> None:
  if not class_names:
    raise errors.DataError(
        f"{directory} has no class folders: put one sub-folder of JPEG/PNG images per class in "
        "it (e.g. DIR/cat/1.jpg, DIR/dog/2.jpg).")
  if len(class_names) == 1:
    raise errors.DataError(
        f"{directory} has only one class folder ({class_names[0]}): a classifier needs at least "
        "two; add a sub-folder of images for each other class.")


def _check_splits(root: str, images: list, eval_fraction: float) -> None:
  for split in ("train", "test"):
    if not any(image.split == split for image in images):
      raise errors.DataError(
          f"{root}: none of its {len(images)} images falls in the {split} split "
          f"(--eval_fraction={eval_fraction}): add images, change --eval_fraction, or give DIR "
          "train/ and test/ sub-folders.")
