"""Measure a DDPM model file the way the paper does: sample quality and likelihood.

    python tools/evaluate.py baselines [-n 500]              # real-vs-real floor, Gaussian
    python tools/evaluate.py quality MODEL.onnx [-n 500]     # FD, baselines, digit-IS, classes
    python tools/evaluate.py nll MODEL.onnx --nll-images 300 # bits/dim, the variational bound
    python tools/evaluate.py steps MODEL.onnx --out DIR      # FD and images/s per sampler and NFE
    python tools/evaluate.py all MODEL.onnx --out DIR        # all of the above, one report
    python tools/evaluate.py inpaint MODEL.onnx --out DIR    # RePaint on held-out digits
    python tools/evaluate.py img2img MODEL.onnx --out DIR    # SDEdit per strength
    python tools/evaluate.py ratedistortion MODEL.onnx       # the paper's fig. 5 over t

The last three (digits only) are in docs/editing.md with their figures.

Digits (1x8x8, 17 levels): the Fréchet distance (FD) uses the hidden features of a
small MLP trained here on scikit-learn's digits (deterministic, cached as .npz data
under $XDG_CACHE_HOME/ddpm-deploy, never downloaded). The 1,797 digits are split once:
797 (stratified by class) train the classifier; the other 1,000 are the FD pool, which
the classifier never saw. The pool is cut at random into two disjoint halves X, Y of
N images, ``--refs`` times over (fixed seeds). Every FD is against Y, at equal N:
  generated N vs Y        the model
  X vs Y                  the floor: two disjoint halves of the data
  N draws vs Y            of a Gaussian fitted to X's pixels: the trivial generator
and each figure is the mean over the splits (± their spread: what one reference set
alone would leave to chance). Random, not class-stratified, halves: a generator draws
its classes at random, and stratified halves would give a floor no generator can reach.
Generated and Gaussian images are quantised to the data's levels first, as the data are.

RGB (or any other shape): FID with the standard Inception features, if the user has
the TorchScript weights file (``inception-2015-12-05.pt``, as StyleGAN2-ADA and
clean-fid use) and passes ``--inception-weights PATH`` and ``--real IMAGES.npz``
(uint8 [N, H, W, C] or [N, C, H, W] under key ``images``). Nothing is downloaded;
without them FID is skipped.

Sampling and bits/dim run through the runtime (numpy + ONNX Runtime); torch is
imported only for the Inception network. The code lives in tools/evaluation/ (metrics,
digits and the classifier, FD/FID, sampling, bits/dim, the steps table, reports, CLI);
this file is the entry point and re-exports its names.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.evaluation.cli import main  # noqa: E402
from tools.evaluation.digits import (  # noqa: E402,F401
    CLASSIFIER_RECIPE,
    DIGITS_LEVELS,
    DIGITS_SHAPE,
    FD_SET_SIZE,
    DigitClassifier,
    DigitsData,
    cache_dir,
    fit_mlp,
    load_classifier,
    load_digits_data,
    recipe_hash,
    train_classifier,
)
from tools.evaluation.fid import DEFAULT_REFS, Evaluator, InceptionFeatures, load_real_npz  # noqa: E402,F401
from tools.evaluation.metrics import (  # noqa: E402,F401
    class_shares,
    digit_inception_score,
    fd_features,
    fitted_gaussian_samples,
    frechet_distance,
    gaussian_stats,
    half_splits,
    quantise,
)
from tools.evaluation.nll import run_nll  # noqa: E402,F401
from tools.evaluation.reports import plot_steps, steps_markdown, write_json  # noqa: E402,F401
from tools.evaluation.sampling import sample_timed, timed_images_per_s  # noqa: E402,F401
from tools.evaluation.steps import DEFAULT_NFE, WITHIN, steps_table  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
