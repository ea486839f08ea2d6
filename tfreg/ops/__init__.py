"""tfreg's numerics core: every piece of registration mathematics lives once in this package.

Modules (each small, one job; the table in docs/architecture.md lists their functions):

* `sampling`: warping an image by a displacement (batch sizes checked).
* `fields`: affine <-> field, scaling and squaring (optionally recomputed in backprop),
  composition, resizing, pyramid upsampling.
* `filters`: box sums, Gaussian smoothing, pyramid pooling; `fourier`: periodic Fourier-domain
  filtering of fields, Gaussian and multi-Gaussian smoothers.
* `differences`: forward/central differences, Jacobian and its determinant.
* `similarity`: the one local NCC (window, clamping, contrast weighting), global NCC, MSE;
  `mk_lncc`: multi-kernel local NCC with strided, dilated windows.
* `inverse`: fixed-point inversion of a displacement field and its inverse-consistency residual.
* `advection`: RK4 map advection under a velocity field.
* `mind`: MIND-SSC descriptors and their distance; `mutual_information`: Parzen-window joint
  histogram (chunked, memory independent of voxels x bins), NMI and MI: similarities across
  contrasts.
* `convolution`: stride-1 convolution whose gradients avoid TensorFlow's slow, im2col-based CPU
  kernels (used by `tfreg.layers.Conv2D` / `Conv3D`, hence by every plugin's networks);
  `activations`: leaky ReLU with its gradient from the output (`tfreg.layers.LeakyReLU`).
* `intensity`: the one intensity normaliser (NumPy).
* `compile_cache`: the one bounded cache of compiled functions.

Layers, losses, instance optimisation and plugins import from here; nothing re-implements it.
"""
