"""Pictures for TensorBoard, drawn with numpy alone: a confusion matrix and a grid of
misclassified test images, each captioned with its true and predicted label.

No plotting library loads in a trainer process (matplotlib alone cost ~0.3 s of start-up), so
captions use the small bitmap font below: digits, letters (upper case), and a few signs.
"""

import numpy as np

# 3x5 glyphs, one row of three pixels per number (4 = left, 2 = middle, 1 = right pixel).
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6),
    "E": (7, 4, 6, 4, 7), "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5),
    "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2), "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7),
    "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4),
    "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5),
    "Y": (5, 5, 2, 2, 2), "Z": (7, 1, 2, 4, 7),
    " ": (0, 0, 0, 0, 0), "-": (0, 0, 7, 0, 0), "_": (0, 0, 0, 0, 7), ".": (0, 0, 0, 0, 2),
    ":": (0, 2, 0, 2, 0), ">": (4, 2, 1, 2, 4), "?": (7, 1, 2, 0, 2),
}
_GLYPH_W, _GLYPH_H, _SCALE = 3, 5, 2
CHAR_W = (_GLYPH_W + 1) * _SCALE  # pixels per character, with one column of spacing
LINE_H = (_GLYPH_H + 2) * _SCALE  # pixels per line of text, with spacing


def text(label: str, width: int) -> np.ndarray:
  """`label` (upper-cased; unknown characters as '?', cut to fit) as a white-on-black uint8
  strip of LINE_H x width pixels."""
  strip = np.zeros((LINE_H, width), np.uint8)
  for i, char in enumerate(label.upper()[:max(0, width // CHAR_W)]):
    rows = _GLYPHS.get(char, _GLYPHS["?"])
    glyph = np.array([[(r >> (2 - c)) & 1 for c in range(_GLYPH_W)] for r in rows], np.uint8)
    glyph = np.kron(glyph, np.ones((_SCALE, _SCALE), np.uint8)) * 255
    top, left = _SCALE, i * CHAR_W + _SCALE // 2
    strip[top:top + glyph.shape[0], left:left + glyph.shape[1]] = glyph
  return strip


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted] (int64)."""
  index = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
  return np.bincount(index, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes)


def confusion_image(counts: np.ndarray, cell: int = 0) -> np.ndarray:
  """The matrix as an RGB uint8 image [H, W, 3]: rows are true classes, columns predictions,
  each row's share drawn on a log scale (the diagonal green, errors red, so one misclassified
  example in 1,000 still shows), class indices along the top and left."""
  n = counts.shape[0]
  cell = cell or max(4, min(32, 480 // max(n, 1)))
  share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  shade = np.where(share > 0, 1.0 + np.log10(np.maximum(share, 1e-3)) / 3.0, 0.0)
  diagonal = np.eye(n, dtype=bool)
  rgb = np.zeros((n, n, 3))
  rgb[..., 0] = np.where(diagonal, 0.0, shade)
  rgb[..., 1] = np.where(diagonal, shade, 0.0)
  grid = np.kron((rgb * 255).astype(np.uint8), np.ones((cell, cell, 1), np.uint8))
  grid[::cell, :, :] = 40  # cell borders
  grid[:, ::cell, :] = 40
  margin = CHAR_W * len(str(n - 1)) + _SCALE
  image = np.zeros((LINE_H + grid.shape[0], margin + grid.shape[1], 3), np.uint8)
  image[LINE_H:, margin:] = grid
  if cell >= CHAR_W * len(str(n - 1)):  # indices only where they fit in a cell
    for i in range(n):
      label = text(str(i), cell)[..., None]
      image[:LINE_H, margin + i * cell:margin + (i + 1) * cell] = label
      row = LINE_H + i * cell + (cell - LINE_H) // 2
      image[row:row + LINE_H, :margin] = text(str(i), margin)[..., None]
  return image


def misclassified_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       class_names=(), limit: int = 36, columns: int = 6,
                       min_tile: int = 84) -> np.ndarray:
  """Up to `limit` misclassified images [N, H, W, C] (uint8), each above two caption lines
  "T <true>" and "P <predicted>" (class names when given, else indices), as one RGB uint8
  image; None when every image is classified correctly."""
  wrong = np.flatnonzero(labels != predictions)[:limit]
  if wrong.size == 0:
    return None
  height, width = images.shape[1:3]
  zoom = max(1, min_tile // max(height, width))
  tile_w = max(width * zoom, CHAR_W * 8)
  tile_h = height * zoom + 2 * LINE_H
  rows = -(-wrong.size // columns)
  sheet = np.full((rows * (tile_h + 4), columns * (tile_w + 4), 3), 30, np.uint8)

  def name(label):
    label = int(label)
    return class_names[label] if label < len(class_names) else str(label)

  for k, index in enumerate(wrong):
    picture = images[index]
    if picture.shape[-1] == 1:
      picture = np.repeat(picture, 3, axis=-1)
    picture = np.kron(picture[..., :3], np.ones((zoom, zoom, 1), np.uint8))
    tile = np.zeros((tile_h, tile_w, 3), np.uint8)
    tile[:picture.shape[0], :picture.shape[1]] = picture
    tile[height * zoom:height * zoom + LINE_H] = text(f"T {name(labels[index])}", tile_w)[..., None]
    caption = text(f"P {name(predictions[index])}", tile_w)[..., None]
    tile[height * zoom + LINE_H:] = caption * np.array([1, 0.35, 0.35])  # the wrong one in red
    top, left = (k // columns) * (tile_h + 4) + 2, (k % columns) * (tile_w + 4) + 2
    sheet[top:top + tile_h, left:left + tile_w] = tile
  return sheet
