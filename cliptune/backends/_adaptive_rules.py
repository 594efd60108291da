"""The rules and constants of the adaptive clip modes, shared by the torch and Keras clippers.

Scales follow the fixed modes (``g * t / max(norm, t)``, no epsilon added to the norm), so torch
and Keras give the same numbers. Each mode's one parameter is ``ClipConfig.threshold``.

- ``autoclip`` (Seetharaman et al. 2020, reference code pseeth/autoclip): the current pre-clip
  global norm is appended to the history first, then the global norm is clipped to the p-th
  percentile of the whole history with linear interpolation (``numpy.percentile``'s default).
  The history grows by one float a step and is sorted each step (the reference keeps it all).
- ``agc`` (Brock et al. 2021, NFNets; reference code deepmind-research/nfnets and timm): a unit is
  an output unit of a weight (torch: dim 0; Keras: the last axis), and a 0-D or 1-D parameter (a
  bias, a gain) is one unit. When ``||G_i|| > lambda *
  max(||W_i||, 1e-3)``, ``G_i`` is scaled by ``lambda * max(||W_i||, 1e-3) / max(||G_i||, 1e-6)``.
- ``zclip`` (Kumar et al. 2025, reference code bluorion-com/ZClip, "zscore" mode with reciprocal
  "adaptive_scaling"): the first 25 steps only collect norms (no clip); then mean and variance
  start from them and follow EMAs with alpha 0.97. With ``z = (g - mean) / (std + 1e-6)``, a step
  with ``z > z_thres`` is clipped to ``mean + z_thres**2 * std / z`` (= ``mean + z_thres * std /
  (z / z_thres)``), and the EMAs are updated with the norm after the clip: ``mean <- a*mean +
  (1-a)*g'``, then ``var <- a*var + (1-a)*(g' - mean)**2`` with the new mean.
"""

AGC_EPS = 1e-3  # floor of a unit's weight norm (the paper's epsilon)
AGC_GRAD_FLOOR = 1e-6  # guards the division by a unit's gradient norm (the reference code's)
ZCLIP_ALPHA = 0.97
ZCLIP_WARMUP = 25
ZCLIP_EPS = 1e-6  # added to the std in the z-score, as in the reference code
