"""``mcie demo``: a small multi-turn editing dataset in the SEED-Data-Edit Part-3 layout, built offline.

Source pictures are the real photographs that ship inside scikit-image (``skimage.data``: astronaut, cat,
coffee, rocket, motorcycle, cameraman), cropped, sometimes mirrored, and resized to 320-384 px. Each instance
gets 2-5 turns of real region edits done with OpenCV/numpy - recolouring an object (hue shift inside its
mask), removing it by ``cv2.inpaint``, pasting an object cut from another photograph or a drawn shape,
brightening, blurring or greying a region, and now and then a global tone (sunset, fog, night, winter) - each
with an instruction that says what was done and where ("make the spoon in the lower right blue").

The annotations follow :mod:`pipeline.seed_format` exactly (``annotations/split_000N.jsonl``, JPEG images
under ``images/data/``). The ground truth - per-turn box (normalised ``x0, y0, x1, y1``), operation (add /
remove / change) and which turns edit the same region twice (about one instance in six has such a conflict)
- goes to a sidecar ``demo_truth.jsonl``, never into the SEED files. Everything is drawn from one seed: the
same seed gives byte-identical files.

It lives beside the ``mcie`` shell, not in ``pipeline/``: it is no stage but the input the stages are tried on
(``mcie demo``, the tests, the benchmarks); it only writes the layout :mod:`pipeline.seed_format` reads.

One module per concern: ``catalogue`` (photographs, objects, edits, colours, tones), ``wording`` (boxes and
instructions), ``pixels`` (the edits themselves, pure array operations), ``build`` (instances and the files).
"""

from mcie.demo.build import DEMO_LICENSE, TRUTH_FILE, DemoSummary, build_demo

__all__ = ["DEMO_LICENSE", "TRUTH_FILE", "DemoSummary", "build_demo"]
