"""Synthetic data generators: the home of every generator of training and evaluation data.

Each generator draws images together with exact labels from a seed, so the same seed always gives the
same example, and needs nothing beyond PIL and numpy (no model, no network):

* `clocks`: analog clock faces with their time (PixMo-Clocks style); `python -m molmo_core.synthetic.clocks`
  writes a labelled set. The trainer's `--data clocks:N` and the app's clock examples use it.

* `shapes`: coloured shapes (circles, squares, triangles, stars, hexagons) with overlaps on varied
  backgrounds, exact per-object masks, one point inside each target and a query such as "red circles";
  `--eval --data shapes:N` evaluates pointing and counting on it (counts 0, 1, 2, ... in turn).

New generators belong here too.
"""
